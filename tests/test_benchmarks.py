"""The benchmarks run through their real code paths on the CPU, in seconds, and write honest records."""
import json
import os
import re
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
    assert rows["torchvision"]["profile"]["input_ms"] >= 0 and rows["torchvision"]["profile"]["step_ms"] > 0


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the same script, running the gpu suite's --dry-run on the CPU."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": str(ROOT / ".venv/bin/python")}
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python3"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(tmp_path / "results")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "all steps passed" in done.stdout and "| torchvision |" in done.stdout
    names = {p.name for p in (tmp_path / "results").iterdir()}
    assert names == {"environment.txt", "steps.log", "records.tar"}  # the GPU machine returns at most 8 files
    with tarfile.open(tmp_path / "results" / "records.tar") as tar:
        records = [n for n in tar.getnames() if n.endswith(".json")]
    assert {n.split("/")[-1].split("-")[0] for n in records} == {"loaders", "train_step", "convert"}
    log = (tmp_path / "results" / "steps.log").read_text()
    assert all(f"== {step}:" in log for step in ("data", "train", "loaders", "scaling", "tests", "convert"))


def test_gpu_check_reports_what_the_budget_left_out(tmp_path):
    """A part that would start after the 8-minute budget is named as not run, and the script fails."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET_S": "0",
           "PYTHON": str(ROOT / ".venv/bin/python")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(tmp_path / "results")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "== train: not run, out of time" in done.stdout and "FAILED or not run: data train" in done.stdout


def test_cpu_suite_then_report(tmp_path):
    """`benchmarks.run --suite cpu` (dry-run sizes) writes every part's records; the report renders them with
    its goals section, and a loader record per stored resolution (256, 512, full size) and for two views."""
    results = tmp_path / "results"
    assert run.main(["--suite", "cpu", "--dry-run", "--results", str(results), "--work", str(tmp_path / "w")]) == 0
    records = report.load([results])
    assert sorted({r["benchmark"] for r in records}) == ["convert", "loaders", "train_step"]
    loader_records = [r for r in records if r["benchmark"] == "loaders"]
    # 256, 512, full size; the worker sweep at 512; the two-view augmentation at 512 (the training data)
    assert sorted(report.resolution(r) for r in loader_records) == ["256 px", "512 px", "512 px", "512 px", "full size"]
    (two_view,) = [r for r in loader_records if r["settings"]["views"] == 2]
    assert {row["label"] for row in two_view["results"]} >= {"dali 2 views", "ffcv 2 views", "torchvision 2 views"}
    scaling = max(loader_records, key=lambda r: len(r["results"]))
    assert {row["workers"] for row in scaling["results"] if row["kind"] == "torchvision"} == {1, 2}
    assert all(r["decode_ceiling"]["images_per_s_per_core"]["median"] > 0 for r in loader_records)
    trains = {r["settings"]["objective"]: r for r in records if r["benchmark"] == "train_step"}
    assert set(trains) == {"supervised", "simclr"}
    assert all(row["profile"]["step_ms"] > 0 for row in trains["supervised"]["results"])
    assert {row["kind"] for row in trains["simclr"]["results"]} >= {"synthetic", "dali", "ffcv", "torchvision"}
    text = report.render(records, tmp_path / "report.md")
    assert "### Goals" in text and "over torchvision, 2 workers, 512 px | 2.5x" in text
    assert "### Training: real input" in text and "### Training (simclr, two views per image" in text


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


def h100_train_record(rows: dict) -> dict:
    """A training record on an H100: kind -> (images/s, input_ms, step_ms) at batch 256."""
    base = rows["synthetic"][0]
    return {"benchmark": "train_step", "gpu": "NVIDIA H100 80GB HBM3, 580.1", "results": [
        {"kind": kind, "batch_size": 256, "images_per_s": {"median": rate}, "input_wait": {"median": 0.0},
         "vs_synthetic": rate / base, "mfu": 0.3, "profile": {"input_ms": wait, "step_ms": step}}
        for kind, (rate, wait, step) in rows.items()]}


def test_goals_say_by_how_much_and_what_the_profile_blames():
    r = h100_train_record({"synthetic": (3000.0, 0.1, 80.0), "dali": (2940.0, 0.2, 81.0),
                           "ffcv": (2400.0, 20.0, 82.0)})
    verdicts = {v.goal: v for v in goals.train_verdicts(r)}
    synthetic = verdicts["training from synthetic input, batch 256"]
    assert not synthetic.met and synthetic.short_by.startswith("14% (500 images/s)") and "MFU 30%" in synthetic.blame
    assert verdicts["training from dali over synthetic, batch 256"].met  # 0.98 >= 0.97
    ffcv = verdicts["training from ffcv over synthetic, batch 256"]
    assert not ffcv.met and ffcv.short_by.startswith("16%") and ffcv.blame.startswith("input: each step waits 20.0 ms")
    slow_step = h100_train_record({"synthetic": (3000.0, 0.1, 80.0), "dali": (2700.0, 0.5, 89.0)})
    (dali,) = [v for v in goals.train_verdicts(slow_step) if "dali" in v.goal]
    assert dali.blame.startswith("contention: the model step takes 9.0 ms longer")
    assert goals.train_verdicts({**r, "gpu": None}) == []  # the H100 goals do not apply on a CPU


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
    assert "### NVIDIA H100 80GB HBM3, 16 cores" in text and "#### Loaders alone" in text
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert png.startswith("benchmarks/charts/") and (tmp_path / png).is_file(), png


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
