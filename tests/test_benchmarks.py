"""The benchmarks run through their real code paths on the CPU, in seconds, and write honest records."""
import json
import os
import re
import statistics
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import goals, loaders, report, run, train_step

ROOT = Path(__file__).resolve().parents[1]


def record(directory: Path, name: str) -> dict:
    (path,) = directory.glob(f"{name}-*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


def test_loader_benchmark_records_medians_and_ratios(converted, tmp_path):
    pytest.importorskip("nvidia.dali")
    assert loaders.main(["--data", str(converted[0]), "--kinds", "dali", "torchvision", "synthetic", "--workers", "1",
                         "--batch-size", "8", "--image-size", "32", "--batches", "2", "--repeats", "3",
                         "--warmup", "1", "--device", "cpu", "--results", str(tmp_path)]) == 0
    r = record(tmp_path, "loaders")
    rows = {row["label"]: row for row in r["results"]}
    assert set(rows) == {"dali", "torchvision", "synthetic"}
    for row in rows.values():
        s = row["images_per_s"]
        assert len(s["repeats"]) == 3 and s["min"] <= s["median"] <= s["max"] and s["median"] > 0
    assert rows["dali"]["vs_torchvision"] == pytest.approx(
        rows["dali"]["images_per_s"]["median"] / rows["torchvision"]["images_per_s"]["median"])
    assert "vs_torchvision" not in rows["torchvision"] and "vs_torchvision" not in rows["synthetic"]
    assert r["cores"] and r["versions"]["torch"] and r["commit"] and r["settings"]["batch_size"] == 8
    for row in rows.values():
        check_epoch_figures(row, batch_size=8, window=2)


def check_epoch_figures(row: dict, *, batch_size: int, window: int) -> None:
    """The epoch boundary, the mid-epoch starts and the ImageNet-epoch projection of one loader row."""
    n = row["epoch_batches"]
    assert n >= 4 and all(window <= count <= n - loaders.LEAD for count in row["window_batches"])
    interval, boundary = row["steady_batch_ms"], row["epoch_boundary_ms"]["median"]
    assert interval == pytest.approx(1e3 * batch_size * row["views"] / row["images_per_s"]["median"])
    assert row["batch_interval_ms"]["min"] <= interval <= row["batch_interval_ms"]["max"] and boundary > 0
    assert row["epoch_boundary_batches"] == pytest.approx(boundary / interval)
    assert row["first_batch_at"] == {"0": 0, "50": n // 2, "90": min(n - 1, n * 9 // 10)}
    first = {at: row["first_batch_ms"][at]["median"] for at in ("0", "50", "90")}
    assert all(value > 0 for value in first.values())
    assert row["first_batch_90_over_0"] == pytest.approx(first["90"] / first["0"])
    assert row["imagenet_epoch_batches"] == 1_153_051 // batch_size
    # one boundary over 144,131 batches: the projection is the steady state less a sliver, never above it
    assert 0.5 * row["images_per_s"]["median"] < row["imagenet_epoch_images_per_s"] <= \
        row["images_per_s"]["median"] * 1.01


def test_loader_benchmark_times_the_epoch_boundary_and_mid_epoch_starts(converted, tmp_path):
    assert loaders.main(["--data", str(converted[0]), "--kinds", "synthetic", "--batch-size", "8",
                         "--image-size", "32", "--batches", "3", "--repeats", "3", "--boundaries", "2",
                         "--starts", "2", "--warmup", "1", "--device", "cpu", "--results", str(tmp_path)]) == 0
    r = record(tmp_path, "loaders")
    (row,) = r["results"]
    check_epoch_figures(row, batch_size=8, window=3)
    assert len(row["epoch_boundary_ms"]["repeats"]) == 2 and len(row["first_batch_ms"]["90"]["repeats"]) == 2
    assert r["goals"]["cpu_epoch_boundary_batches"] == goals.CPU_EPOCH_START
    assert "| synthetic | - |" in (tmp_path / next(tmp_path.glob("loaders-*.md")).name).read_text()
    jpegs = r["data_jpegs"]  # the stored JPEGs beside the reference photo (benchmarks/jpeg_stats.py)
    assert jpegs["images"] == 64 and 0 < jpegs["bytes_per_pixel"] < 2 and len(jpegs["decode_ms_per_mp"]["repeats"]) == 3
    assert jpegs["reference"]["decode_ms_per_mp"]["median"] > 0 and jpegs["decode_vs_reference"] > 0
    assert "Stored JPEGs (64 sampled)" in (tmp_path / next(tmp_path.glob("loaders-*.md")).name).read_text()


class EpochLog:
    """A loader that logs the (epoch, batch) of every batch it yields, and seeks as the contract says."""

    def __init__(self, batches: int):
        self.batches, self.epoch, self.start, self.log = batches, 0, 0, []

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        for batch in range(self.start, self.batches):
            self.log.append((self.epoch, batch))
            yield torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.int64)


def measure_fake(loader, monkeypatch, **settings):
    monkeypatch.setattr(loaders, "build_loader", lambda *args, **kwargs: loader)
    args = loaders.parse_args(["--data", "unused", "--batch-size", "4", "--warmup", "1", "--device", "cpu",
                               *settings.get("argv", [])])
    return loaders.measure("fake", Path("unused"), workers=1, device=torch.device("cpu"), args=args, options=None)


def test_windows_stay_inside_an_epoch_and_the_boundary_reads_its_end(monkeypatch):
    fake = EpochLog(batches=20)
    result = measure_fake(fake, monkeypatch, argv=["--batches", "5", "--repeats", "2", "--boundaries", "2",
                                                   "--starts", "1"])
    by_epoch: dict[int, list[int]] = {}
    for epoch, batch in fake.log:
        by_epoch.setdefault(epoch, []).append(batch)
    # epoch 0: the warm-up; 1-2: windows from the epoch's start (2 filling batches, 5 timed); 3-6: two
    # boundaries (the last 3 batches of one epoch, then the next's first); 7-9: starts at 0, 50 and 90 %
    assert by_epoch[1] == by_epoch[2] == list(range(loaders.LEAD + 5))
    assert by_epoch[3] == by_epoch[5] == [17, 18, 19] and by_epoch[4] == by_epoch[6] == [0]
    assert [by_epoch[e] for e in (7, 8, 9)] == [[0], [10], [18]]
    assert result["window_batches"] == [5, 5] and result["first_batch_at"] == {"0": 0, "50": 10, "90": 18}


def test_a_window_ends_with_its_epoch(monkeypatch):
    """A window asked for more batches than its epoch holds stops at the epoch's end, not in the next one."""
    fake = EpochLog(batches=6)
    result = measure_fake(fake, monkeypatch, argv=["--batches", "50", "--repeats", "1", "--boundaries", "1",
                                                   "--starts", "1"])
    assert result["window_batches"] == [6 - loaders.LEAD]
    assert [b for e, b in fake.log if e == 1] == list(range(6))


def test_a_loader_that_cannot_seek_or_is_too_short_is_refused_by_name(monkeypatch):
    class NoSeek(EpochLog):
        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch
    with pytest.raises(TypeError, match="'fake' loader's set_epoch takes no start_batch"):
        measure_fake(NoSeek(batches=20), monkeypatch)
    with pytest.raises(ValueError, match="epoch has 3 batches; the benchmark needs at least 4"):
        measure_fake(EpochLog(batches=3), monkeypatch)


def test_train_step_benchmark_reports_real_over_synthetic(converted, tmp_path):
    assert train_step.main(["--data", str(converted[0]), "--preset", "tiny_cpu", "--kinds", "synthetic", "torchvision",
                            "--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1", "--workers", "1",
                            "--device", "cpu", "--results", str(tmp_path), "--profile", str(tmp_path / "prof")]) == 0
    trace = json.loads((tmp_path / "prof" / "trace-torchvision-batch8.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"input: next batch", "train step"} <= names  # the stall can be put down to one or the other
    r = record(tmp_path, "train_step")
    rows = {row["kind"]: row for row in r["results"]}
    assert rows["synthetic"]["vs_synthetic"] == 1.0
    assert rows["torchvision"]["vs_synthetic"] == pytest.approx(
        rows["torchvision"]["images_per_s"]["median"] / rows["synthetic"]["images_per_s"]["median"])
    # the tiny ViT (4 blocks, 64 tokens of 192 dims) costs tens of MFLOP per image, forward and backward
    assert 1e6 < rows["synthetic"]["train_flops_per_image"] < 1e9
    assert rows["synthetic"]["mfu"] is None  # no stated peak on a CPU: no MFU rather than a made-up one
    # the profile's figures are the medians of the spans the trace shows (its clock in us, the same steps)
    spans = {name: statistics.median(e["dur"] / 1e3 for e in trace["traceEvents"] if e.get("name") == name)
             for name in ("input: next batch", "train step")}
    assert rows["torchvision"]["profile"]["input_ms"] == pytest.approx(spans["input: next batch"], abs=1.0) and \
        rows["torchvision"]["profile"]["step_ms"] == pytest.approx(spans["train step"], abs=1.0), (spans, rows)


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the same script, running the gpu suite's --dry-run on the CPU."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": str(ROOT / ".venv/bin/python")}
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python3"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(tmp_path / "results")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=960)  # its budget: 900 s
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "all steps passed" in done.stdout and "| torchvision |" in done.stdout
    names = {p.name for p in (tmp_path / "results").iterdir()}
    assert names == {"environment.txt", "steps.log", "records.tar"}  # the GPU machine returns at most 8 files
    with tarfile.open(tmp_path / "results" / "records.tar") as tar:
        records = [n for n in tar.getnames() if n.endswith(".json")]
    assert {n.split("/")[-1].split("-")[0] for n in records} == {"loaders", "train_step", "resolution", "convert",
                                                                  "checkpoint", "smoke", "evaluation", "dali_feed"}
    log = (tmp_path / "results" / "steps.log").read_text()
    parts = ("data", "smoke", "gpu-tests", "train", "dali-feed", "loaders", "compile", "resolution", "evaluation",
             "simclr", "mae", "colorize", "batch256", "tests", "scaling", "convert", "checkpoint")
    assert all(f"== {step}:" in log for step in parts)
    assert [line.split()[1] for line in log.splitlines() if line.startswith("== ") and "(limit" in line] == list(parts)
    with tarfile.open(tmp_path / "results" / "records.tar") as tar:
        (smoke,) = [json.load(tar.extractfile(n)) for n in records if n.split("/")[-1].startswith("smoke-")]
    assert [r["loader"] for r in smoke["results"]] == ["dali", "ffcv"] and all(r["ok"] for r in smoke["results"])


def test_gpu_check_required_parts_fit_400_s_and_records_return_as_parts_end():
    """The required parts' limits add up to at most 400 s of the 540 s budget, and the script packs the records
    after every part, so a check stopped at any moment returns the finished parts' records."""
    script = (ROOT / "benchmarks/gpu_check.sh").read_text()
    required = [int(m.group(1)) for m in re.finditer(r"^step \S+ (\d+) ", script, re.MULTILINE)]
    optional = [m.group(1) for m in re.finditer(r"^extra (\S+) \d+ ", script, re.MULTILINE)]
    assert len(required) == 4 and sum(required) <= 400, required
    assert {"simclr", "mae", "colorize", "batch256"} <= set(optional)
    body = script[script.index("run_part() {"):script.index("step() {")]
    assert "pack" in body.split("tee -a")[-1], "run_part must pack the records when a part ends"


def test_gpu_check_reports_what_the_budget_left_out(tmp_path):
    """A part that would start after the 8-minute budget is named as not run, and the script fails."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET_S": "0",
           "PYTHON": str(ROOT / ".venv/bin/python")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(tmp_path / "results")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "== train: not run, out of time" in done.stdout
    assert "FAILED or not run: data smoke gpu-tests train dali-feed loaders" in done.stdout


def test_cpu_suite_then_report(tmp_path):
    """`benchmarks.run --suite cpu` (dry-run sizes) writes every part's records; the report renders them with
    its goals section, a loader record per stored resolution (256, 512, full size) and for two views, RandAugment
    on against off at 512 px (the training data), and the resolution ramp's sizes with the projected run."""
    results = tmp_path / "results"
    assert run.main(["--suite", "cpu", "--dry-run", "--results", str(results), "--work", str(tmp_path / "w")]) == 0
    records = report.load([results])
    assert sorted({r["benchmark"] for r in records}) == ["convert", "loaders", "resolution", "train_step"]
    loader_records = [r for r in records if r["benchmark"] == "loaders"]
    # 256, 512, full size; the worker sweep at 512; the two-view augmentation at 512 (the training data)
    assert sorted(report.resolution(r) for r in loader_records) == ["256 px", "512 px", "512 px", "512 px", "full size"]
    (two_view,) = [r for r in loader_records if r["settings"]["views"] == 2]
    assert {row["label"] for row in two_view["results"]} >= {"dali 2 views", "ffcv 2 views", "torchvision 2 views"}
    scaling = max(loader_records, key=lambda r: len({row["workers"] for row in r["results"]}))
    assert {row["workers"] for row in scaling["results"] if row["kind"] == "torchvision"} == {1, 2}
    assert all(r["decode_ceiling"]["images_per_s_per_core"]["median"] > 0 for r in loader_records)
    (augmented,) = [r for r in loader_records if r["settings"]["rand_augment"]]
    assert report.resolution(augmented) == "512 px" and augmented["settings"]["rand_augment"] == run.RAND_AUGMENT
    on = {row["kind"]: row for row in augmented["results"] if row["rand_augment"]}
    assert set(on) == {"dali", "ffcv", "torchvision"} and all(row["vs_rand_augment_off"] > 0 for row in on.values())
    for r in loader_records:
        for row in r["results"]:
            if not row.get("rand_augment"):  # the on rows are in-epoch only
                check_epoch_figures(row, batch_size=8, window=2)
    (ramp,) = [r for r in records if r["benchmark"] == "resolution"]
    assert {(row["preset"], row["size"]) for row in ramp["results"]} == {("tiny_cpu_deit", 24), ("tiny_cpu_deit", 32),
                                                                         ("tiny_cpu", 32)}
    assert {run_["preset"] for run_ in ramp["projection"]} == {"tiny_cpu_deit", "tiny_cpu"}
    trains = {r["settings"]["objective"]: r for r in records if r["benchmark"] == "train_step"}
    assert set(trains) == {"supervised", "simclr", "mae", "colorize"}
    assert all(row["profile"]["step_ms"] > 0 for row in trains["supervised"]["results"])
    for name in ("simclr", "mae", "colorize"):
        assert {row["kind"] for row in trains[name]["results"]} >= {"synthetic", "dali", "ffcv", "torchvision"}
    # each self-supervised part trains its objective's own preset, at the supervised part's batch
    assert [trains[name]["settings"]["preset"] for name in ("mae", "colorize")] == ["tiny_cpu_mae", "tiny_cpu_colorize"]
    assert {trains[name]["settings"]["batch_size"][0] for name in trains} == {8}
    text = report.render(records, tmp_path / "report.md")
    assert "### Goals" in text and "over torchvision, 2 workers, 512 px | 2.5x" in text
    for kind in ("dali", "ffcv", "torchvision"):
        assert f"| {kind} epoch start, 2 workers, 512 px | <= 2 batch-times |" in text
        assert f"| {kind} first batch at 90 % of an epoch over at 0, 2 workers, 512 px | <= 2x |" in text
    assert "| epoch boundary ms (batch-times) | first batch at 0/50/90 % ms | ImageNet epoch images/s |" in text
    assert "### Training (batch 8): real input" in text and "### Training (simclr, batch 8, two views per image" in text
    assert "### Training (mae, batch 8, mask ratio 0.75" in text and "### Training (colorize, batch 8)" in text
    assert "### Can each loader alone feed MAE? (mae, batch 8)" in text
    for kind in ("dali", "ffcv", "torchvision"):
        assert re.search(rf"\| {kind} \| 2 \| [\d,]+ \| [\d,]+ \| (can feed MAE \(|cannot feed MAE: )", text), kind
    assert "### RandAugment cost per loader" in text and f"| ffcv | 2 | {run.RAND_AUGMENT} |" in text
    assert "### Stored JPEGs against a real photo" in text
    assert "### Progressive resolution" in text and "| tiny_cpu_deit | 24 x 2, 32 x 6 |" in text


def test_gpu_suite_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run.main(["--suite", "gpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


RESULTS = ROOT / "benchmarks" / "results"


def test_report_renders_the_recorded_results(tmp_path):
    """From the committed records (H100 and this CPU): a section per machine, tables, and real PNG charts."""
    out = tmp_path / "report.md"
    assert report.main(["--results", str(RESULTS), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## NVIDIA H100 80GB HBM3, 16 cores" in text and "no GPU" in text
    assert "| dali | 8 | full size | cuda | 10,360 |" in text  # the recorded median, unchanged
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def fake_record(directory: Path, name: str, medians: dict, date: str) -> None:
    rows = [{"label": label, "kind": label, "workers": 2, "options": {},
             "images_per_s": {"median": value, "min": value, "max": value, "stdev": 0, "repeats": [value]}}
            for label, value in medians.items()]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({
        "benchmark": "loaders", "date": date, "cpu": "Test CPU", "cores": 2, "gpu": None, "commit": "abc",
        "settings": {"device": "cpu", "max_resolution": 512}, "results": rows}))


def test_compare_gives_b_over_a_for_the_figures_both_sets_have(tmp_path, capsys):
    fake_record(tmp_path / "a", "loaders-1", {"dali": 100.0, "ffcv": 200.0, "torchvision": 50.0}, "20260101T000000Z")
    fake_record(tmp_path / "b", "loaders-2", {"dali": 250.0, "ffcv": 100.0}, "20260102T000000Z")
    rows = report.compare(report.load([tmp_path / "a"]), report.load([tmp_path / "b"]))
    assert {name.split(",")[0]: ratio for _, name, _, _, ratio in rows} == {"loader dali": 2.5, "loader ffcv": 0.5}
    assert report.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| 2.50 |" in capsys.readouterr().out


def hopper_train_record(rows: dict, gpu: str = "NVIDIA H100 80GB HBM3, 580.1", capability=None,
                        batch: int = 64) -> dict:
    """A training record: kind -> (images/s, input_ms, step_ms) at one batch size."""
    base = rows["synthetic"][0]
    r = {"benchmark": "train_step", "gpu": gpu, "results": [
        {"kind": kind, "batch_size": batch, "images_per_s": {"median": rate}, "input_wait": {"median": 0.0},
         "vs_synthetic": rate / base, "mfu": 0.3, "profile": {"input_ms": wait, "step_ms": step}}
        for kind, (rate, wait, step) in rows.items()]}
    return {**r, "gpu_compute_capability": capability} if capability is not None else r


def test_goals_say_by_how_much_and_what_the_profile_blames():
    r = hopper_train_record({"synthetic": (3000.0, 0.1, 80.0), "dali": (2985.0, 0.2, 81.0),
                             "ffcv": (2700.0, 20.0, 82.0)})
    verdicts = {v.goal: v for v in goals.train_verdicts(r)}
    synthetic = verdicts["training from synthetic input, batch 64"]
    assert synthetic.target == "4,000 (43% MFU at 989 TFLOP/s)"
    assert not synthetic.met and synthetic.short_by.startswith("25% (1,000 images/s)") and "MFU 30%" in synthetic.blame
    assert verdicts["training from dali over synthetic, batch 64"].met  # 0.995 >= 0.99
    ffcv = verdicts["training from ffcv over synthetic, batch 64"]  # 0.90 against 0.97
    assert not ffcv.met and ffcv.short_by.startswith("7%") and ffcv.blame.startswith("input: each step waits 20.0 ms")
    slow_step = hopper_train_record({"synthetic": (3000.0, 0.1, 80.0), "dali": (2700.0, 0.5, 89.0)})
    (dali,) = [v for v in goals.train_verdicts(slow_step) if "dali" in v.goal]
    assert dali.blame.startswith("contention: the model step takes 9.0 ms longer")
    assert goals.train_verdicts({**r, "gpu": None}) == []  # the Hopper goals do not apply on a CPU


def test_hopper_goals_apply_to_h100_and_h200_by_capability_then_by_name():
    rows = {"synthetic": (4200.0, 0.1, 15.0), "dali": (4180.0, 0.1, 15.1), "ffcv": (4000.0, 0.3, 15.2)}
    h200 = hopper_train_record(rows, gpu="NVIDIA H200, 580.1", capability="9.0")
    verdicts = {v.goal: v for v in goals.train_verdicts(h200)}
    assert verdicts["training from synthetic input, batch 64"].met  # 4,200 >= 4,000
    assert verdicts["training from dali over synthetic, batch 64"].met  # 0.995 >= 0.99
    assert not verdicts["training from ffcv over synthetic, batch 64"].met  # 0.952 < 0.97
    assert len(goals.train_verdicts(hopper_train_record(rows))) == 3  # an H100 record without a capability
    assert len(goals.train_verdicts(hopper_train_record(rows, gpu="NVIDIA H800", capability=[9, 0]))) == 3
    assert goals.train_verdicts(hopper_train_record(rows, gpu="NVIDIA H800")) == []  # no capability, no H100/H200
    assert goals.train_verdicts(hopper_train_record(rows, gpu="NVIDIA A100-SXM4-80GB", capability="8.0")) == []
    assert goals.train_verdicts(hopper_train_record(rows, capability="9.0", batch=256)) == []  # the goals' batch is 64


def test_report_keeps_the_suite_run_the_compile_sweep_and_batch_256_apart(tmp_path):
    """The GPU check writes three training records in one run; each is reported, and the goals come from the
    supervised batch-64 one, not from the newer sweep (whose synthetic rows differ by compile mode)."""
    suite = hopper_train_record({"synthetic": (4100.0, 0.1, 15.0), "dali": (4090.0, 0.1, 15.0)}, capability="9.0")
    sweep = hopper_train_record({"synthetic": (3000.0, 0.1, 15.0)}, capability="9.0")
    sweep["results"] += [{**sweep["results"][0], "compile_mode": "reduce-overhead", "fused": True,
                          "images_per_s": {"median": 4500.0}}]
    large = hopper_train_record({"synthetic": (4400.0, 0.1, 15.0), "dali": (4300.0, 0.1, 15.0)}, capability="9.0",
                                batch=256)
    for n, r in enumerate((suite, sweep, large)):
        r |= {"date": f"2026120{n + 1}T000000Z", "cpu": "Xeon", "cores": 16, "commit": "abc", "settings": {},
              "_file": f"train_step-{n}.json"}
    latest = report.newest([suite, sweep, large])
    assert sorted(key[2] for key in latest) == ["batch 256", "batch 64", "batch 64, compile sweep"]
    text = report.render([suite, sweep, large], tmp_path / "report.md")
    assert "| training from synthetic input, batch 64 | 4,000 (43% MFU at 989 TFLOP/s) | 4,100 | yes |" in text
    assert "| synthetic | 64 | reduce-overhead | yes | 4,500.0 |" in text
    assert "### Training (batch 256): real input against synthetic" in text


def gpu_loader_record(gpu: str, capability, medians: dict) -> dict:
    rows = [{"kind": k, "label": k, "workers": 16, "options": {}, "images_per_s": {"median": v}}
            for k, v in medians.items()]
    return {"gpu": gpu, "gpu_compute_capability": capability, "cores": 16, "results": rows,
            "decode_ceiling": {"images_per_s_per_core": {"median": 400.0}}}


def test_hopper_loader_goals_at_full_size_and_ffcv_at_512_px():
    full = gpu_loader_record("NVIDIA H200", "9.0", {"dali": 10_500.0, "ffcv": 4_000.0, "torchvision": 900.0})
    dali, ffcv = goals.loader_verdicts(full, on_gpu=True, resolution="full size")
    assert dali.met and dali.target == "10,000"
    assert not ffcv.met and ffcv.short_by == "20% (1,000 images/s)"
    assert ffcv.blame == "CPU JPEG decode: it runs at 62% of what 16 cores decode with PIL"  # 4,000 / (16 x 400)
    (ffcv512,) = goals.loader_verdicts({**full, "results": full["results"][1:]}, on_gpu=True, resolution="512 px")
    assert ffcv512.target == "5,500" and ffcv512.goal.startswith("ffcv alone, 512-px JPEGs (16 workers, 16 cores)")
    assert not ffcv512.met and ffcv512.short_by == "27% (1,500 images/s)"
    ampere = {**full, "gpu": "NVIDIA A100", "gpu_compute_capability": "8.0"}
    assert goals.loader_verdicts(ampere, on_gpu=True, resolution="full size") == []


def epoch_row(kind: str, *, interval: float, boundary: float, first: tuple[float, float, float],
              batches: int = 200) -> dict:
    """A loader row with the epoch figures: ms per in-epoch batch, the boundary, the first batch at 0/50/90 %."""
    at = {"0": 0, "50": batches // 2, "90": batches * 9 // 10}
    return {"kind": kind, "label": kind, "workers": 2, "options": {}, "images_per_s": {"median": 32e3 / interval},
            "steady_batch_ms": interval, "epoch_boundary_ms": {"median": boundary},
            "epoch_boundary_batches": boundary / interval, "first_batch_at": at,
            "first_batch_ms": {k: {"median": v} for k, v in zip(at, first)},
            "first_batch_90_over_0": first[2] / first[0]}


def test_cpu_epoch_start_and_resume_goals_say_by_how_much_and_why():
    rows = [epoch_row("dali", interval=37.0, boundary=320.0, first=(330.0, 332.0, 335.0)),  # rebuilt each epoch
            epoch_row("ffcv", interval=38.0, boundary=60.0, first=(116.0, 230.0, 348.0)),  # a slow seek
            epoch_row("torchvision", interval=37.0, boundary=70.0, first=(240.0, 3940.0, 6900.0)),  # reads through
            epoch_row("synthetic", interval=0.01, boundary=1.0, first=(0.01, 0.01, 0.01))]  # no goal
    verdicts = {v.goal.split(",")[0]: v for v in goals.epoch_verdicts(rows, "512 px")}
    assert set(verdicts) == {f"{kind} {goal}" for kind in ("dali", "ffcv", "torchvision")
                             for goal in ("epoch start", "first batch at 90 % of an epoch over at 0")}
    dali = verdicts["dali epoch start"]
    assert not dali.met and dali.measured == "8.6 (320 ms)" and dali.short_by.startswith("332% over (8.65 against")
    assert dali.blame.startswith("epoch set-up: the boundary (320 ms) costs what a start at batch 0 does (330 ms")
    assert verdicts["ffcv epoch start"].met and verdicts["torchvision epoch start"].met  # 1.6 and 1.9 <= 2
    assert verdicts["dali first batch at 90 % of an epoch over at 0"].met  # 1.02x
    ffcv = verdicts["ffcv first batch at 90 % of an epoch over at 0"]
    assert not ffcv.met and ffcv.measured == "3.00x (348 against 116 ms)" and ffcv.short_by.startswith("50% over")
    assert ffcv.blame.startswith("the seek itself: 232 ms more than at batch 0 over 180 skipped batches (1.29 ms")
    torchvision = verdicts["torchvision first batch at 90 % of an epoch over at 0"]
    assert torchvision.blame.startswith("no seek: the 180 skipped batches cost 37.0 ms each, 100% of an in-epoch")
    slow = goals.epoch_verdicts([epoch_row("dali", interval=37.0, boundary=150.0, first=(330.0, 330.0, 330.0))], "")
    assert slow[0].blame.startswith("epoch set-up, partly overlapped: the boundary (150 ms) is below a start")
    old = [{k: v for k, v in row.items() if not k.startswith(("epoch_", "first_"))} for row in rows]
    assert goals.epoch_verdicts(old, "512 px") == []  # records from before these figures: no verdict


def test_cpu_loader_goal_blames_the_decode_ceiling():
    rows = [{"kind": k, "label": k, "workers": 2, "options": {}, "images_per_s": {"median": v}}
            for k, v in (("dali", 300.0), ("ffcv", 320.0), ("torchvision", 240.0))]
    r = {"results": rows, "decode_ceiling": {"images_per_s_per_core": {"median": 150.0}}}
    dali, ffcv = goals.loader_verdicts(r, on_gpu=False, resolution="512 px")
    assert dali.measured == "1.25x" and not dali.met and dali.short_by.startswith("50%")
    # torchvision decodes at 240 / (2 x 150) = 80 % of the ceiling, so 2.5x it would be 200 % of the ceiling
    assert "torchvision runs at 80% of 2 cores' worth and dali at 100%" in dali.blame
    assert "2.5x torchvision would be 200% of what the cores can decode" in dali.blame
    assert ffcv.measured == "1.33x"


def test_readme_block_is_filled_and_refilled(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{report.README_START}\nstale\n{report.README_END}\n\n## After\n")
    out = tmp_path / "benchmarks" / "report.md"
    out.parent.mkdir()
    for _ in range(2):  # a second run replaces the block rather than adding to it
        assert report.main(["--results", str(RESULTS), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.count(report.README_START) == 1 and text.endswith("## After\n")
    block = text.split(report.README_START)[1].split(report.README_END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) == 5, block  # the headlines only: the tables stay in report.md
    assert "#### Loaders alone" not in text and "](benchmarks/report.md)" in block and out.is_file()
    for row in rows:  # each names its hardware and a record that exists
        figure, value, hardware, file = [cell.strip() for cell in row.strip("|").split("|")]
        assert value[0].isdigit() and (" cores" in hardware) and (RESULTS / file).is_file(), row
    assert "NVIDIA H100 80GB HBM3, 16 cores" in block  # the GPU loader figure comes from the H100 record
    # DALI over torchvision at the converter's default size, though a newer record holds another size
    assert "DALI loader over the torchvision baseline (2 workers, 512 px JPEGs)" in block


def test_a_failing_loader_costs_only_its_own_rows(converted, tmp_path, monkeypatch):
    """On a short GPU window, one broken configuration must not lose the others' figures: it is recorded as
    failed, the rest are measured, and the exit status says so."""
    real = loaders.measure

    def measure(kind, *args, **kwargs):
        if kind == "torchvision":
            raise RuntimeError("injected")
        return real(kind, *args, **kwargs)
    monkeypatch.setattr(loaders, "measure", measure)
    assert loaders.main(["--data", str(converted[0]), "--kinds", "torchvision", "synthetic", "--workers", "1",
                         "--batch-size", "8", "--image-size", "32", "--batches", "2", "--repeats", "2",
                         "--warmup", "1", "--device", "cpu", "--results", str(tmp_path)]) == 1
    r = record(tmp_path, "loaders")
    assert [row["label"] for row in r["results"]] == ["synthetic"]
    assert r["failed"] == [{"label": "torchvision", "workers": 1, "error": "RuntimeError: injected"}]


def test_checkpoint_benchmark_writes_real_checkpoints_and_projects_the_cost(tmp_path):
    """The tiny preset's state through the trainer's Writer: a record with the training thread's wait, the side
    thread's write, the step slowdown meanwhile and the share of an interval; the written files load back."""
    from benchmarks import checkpoint as bench
    from training import checkpoint
    assert bench.main(["--preset", "tiny_cpu", "--repeats", "2", "--dir", str(tmp_path / "ckpt"),
                       "--results", str(tmp_path / "records")]) == 0
    record = json.loads(next((tmp_path / "records").glob("checkpoint-*.json")).read_text())
    assert record["snapshot_s"]["median"] > 0 and record["write_s"]["median"] > 0
    assert len(record["write_s"]["repeats"]) == 2 and record["step_slowdown"] > 0
    assert record["cost_share"] == pytest.approx(record["blocked_s"] / (record["interval_min"] * 60))
    assert record["file_bytes"] >= record["state_bytes"] and record["commit"]
    for name in ("last.pt", "previous.pt"):
        saved = checkpoint.load(tmp_path / "ckpt" / name)  # the CRC checked
        assert saved["position"] == {"step": 1} and saved["model"]


def feed_records(tmp_path: Path) -> list[dict]:
    """A MAE training record beside loader records of the same CPU: at 512 px an older run and a newer one that
    remeasured dali, with rows that are not the plain train augmentation; at 256 px a faster one."""
    fake_record(tmp_path, "loaders-1", {"dali": 900.0, "ffcv": 300.0, "torchvision": 376.0, "synthetic": 1e7},
                "20260101T000000Z")
    fake_record(tmp_path, "loaders-2", {"dali": 655.0}, "20260102T000000Z")
    newer = json.loads((tmp_path / "loaders-2.json").read_text())
    newer["results"] += [dict(newer["results"][0], label="dali reader=webdataset", options={"reader": "webdataset"}),
                         dict(newer["results"][0], label="dali 2 views", views=2),
                         dict(newer["results"][0], label="dali + rand-m9", rand_augment="rand-m9")]
    for row in newer["results"][1:]:
        row["images_per_s"] = {"median": 5000.0}
    newer["settings"].update(image_size=224, batch_size=32)
    (tmp_path / "loaders-2.json").write_text(json.dumps(newer))
    fake_record(tmp_path, "loaders-3", {"dali": 2000.0, "ffcv": 2000.0, "torchvision": 2000.0}, "20260103T000000Z")
    other = json.loads((tmp_path / "loaders-3.json").read_text())
    other["settings"]["max_resolution"] = 256
    (tmp_path / "loaders-3.json").write_text(json.dumps(other))
    train = {"benchmark": "train_step", "date": "20260104T000000Z", "cpu": "Test CPU", "cores": 2, "gpu": None,
             "commit": "def", "settings": {"data": "/nowhere/cpu/r512", "device": "cpu", "objective": "mae",
                                           "config": {"data": {"image_size": 32}, "mae": {"mask_ratio": 0.75}}},
             "results": [{"kind": kind, "batch_size": 32, "compile_mode": "none", "fused": False,
                          "images_per_s": {"median": rate}, "input_wait": {"median": 0.0}, "mfu": None}
                         for kind, rate in (("dali", 350.0), ("synthetic", 400.0))]}
    (tmp_path / "train_step-1.json").write_text(json.dumps(train))
    return report.load([tmp_path])


def test_the_report_says_which_loaders_alone_can_feed_mae(tmp_path):
    """MAE's consumption (its step from synthetic input, 400 images/s) against each loader alone, from the newest
    plain rows of the same machine and stored resolution: dali's remeasured 655 (not the older 900, nor the
    256-px record's 2,000, nor its option, two-view and RandAugment rows) can feed it; ffcv's 300 and
    torchvision's 376 cannot, and the table says by how much."""
    records = feed_records(tmp_path)
    (train,) = [r for r in records if r["benchmark"] == "train_step"]
    lines = report.feed_section(train, report.newest(records))
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| loader |")]
    assert table == [
        "| dali | 2 | 655 | 400 | can feed MAE (1.64x) | loaders-2.json |",
        "| ffcv | 2 | 300 | 400 | cannot feed MAE: 300 of 400 images/s | loaders-1.json |",
        "| torchvision | 2 | 376 | 400 | cannot feed MAE: 376 of 400 images/s | loaders-1.json |"]
    assert "timed at 224-px crops and the training reads 32-px ones" in " ".join(lines)
    text = report.render([r for r in records if r["benchmark"] == "train_step"], tmp_path / "report.md")
    assert "### Training (mae, batch 32, mask ratio 0.75: the encoder sees 25% of the patches)" in text
    assert "### Can each loader alone feed MAE? (mae, batch 32)" in text and "No loader record for" in text
