"""benchmarks/loaders.py --rand-augment (each loader with RandAugment on against off, side by side) and
benchmarks/resolution.py (training images/s at each size of a resolution ramp, and the projected wall-clock of an
ImageNet run), end to end on the CPU with tiny sizes, and in the report."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks import goals, loaders, report, resolution
from training.config import load_config

SPEC = "rand-m9-mstd0.5-inc1"


def only_record(directory: Path, name: str) -> dict:
    (path,) = directory.glob(f"{name}-*.json")
    assert path.with_suffix(".md").is_file()
    return {**json.loads(path.read_text()), "_file": path.name}


def test_loaders_measure_rand_augment_on_against_off(converted, tmp_path):
    """A real loader twice, RandAugment off and on, in one run; the on row carries the spec, its off figure and
    the ratio; the synthetic loader (which ignores rand_augment) is measured off only. DALI alone, the quickest
    to build: benchmarks.run's dry suites (tests/test_benchmarks.py) run every loader's pair."""
    pytest.importorskip("nvidia.dali")
    assert loaders.main(["--data", str(converted[0]), "--kinds", "dali", "synthetic", "--workers", "1",
                         "--batch-size", "8", "--image-size", "32", "--batches", "2", "--repeats", "2",
                         "--boundaries", "1", "--starts", "1", "--warmup", "1", "--device", "cpu",
                         "--rand-augment", SPEC, "--results", str(tmp_path)]) == 0
    r = only_record(tmp_path, "loaders")
    rows = {row["label"]: row for row in r["results"]}
    assert set(rows) == {"dali", f"dali + {SPEC}", "synthetic"} and r["settings"]["rand_augment"] == SPEC
    off, on = rows["dali"], rows[f"dali + {SPEC}"]
    assert off["rand_augment"] is None and on["rand_augment"] == SPEC and on["kind"] == "dali"
    assert rows["synthetic"]["rand_augment"] is None
    assert len(on["images_per_s"]["repeats"]) == len(off["images_per_s"]["repeats"]) == 2
    assert on["rand_augment_off"] == {"label": "dali", "images_per_s": off["images_per_s"]["median"]}
    assert on["vs_rand_augment_off"] == pytest.approx(on["images_per_s"]["median"] / off["images_per_s"]["median"])
    assert "epoch_boundary_ms" not in on and "first_batch_ms" not in on  # in-epoch only, as the docs say
    assert "epoch_boundary_ms" in off and "imagenet_epoch_images_per_s" in off  # the off row keeps them all
    md = next(tmp_path.glob("loaders-*.md")).read_text()
    assert f"| dali + {SPEC} | 1 | {on['images_per_s']['median']:,.0f} |" in md  # in the main table, and paired:
    assert "| loader | workers | RandAugment | off images/s | on images/s | on spread (min-max) | on / off |" in md
    assert f"| dali | 1 | {SPEC} | {off['images_per_s']['median']:,.0f} | {on['images_per_s']['median']:,.0f} | " in md
    assert f"| {on['vs_rand_augment_off']:.2f}x |" in md
    text = report.render(report.load([tmp_path]), tmp_path / "report.md")
    assert "### RandAugment cost per loader" in text
    assert f"| dali | 1 | {SPEC} | " in text and f"| {r['_file']} (commit {r['commit']}) |" in text


def rate_row(kind: str, rate: float, rand_augment=None) -> dict:
    return {"kind": kind, "label": kind + (f" + {rand_augment}" if rand_augment else ""), "workers": 2, "options": {},
            "views": 1, "rand_augment": rand_augment, "images_per_s": {"median": rate}}


def test_ratios_and_goals_compare_like_with_like():
    """dali on over torchvision on, dali off over torchvision off; the goals (for the plain augmentation) are
    untouched by the RandAugment rows."""
    rows = [rate_row("dali", 300.0), rate_row("dali", 150.0, SPEC), rate_row("torchvision", 200.0),
            rate_row("torchvision", 50.0, SPEC)]
    loaders.add_ratios(rows)
    assert [row.get("vs_torchvision") for row in rows] == [1.5, 3.0, None, None]
    r = {"results": rows, "decode_ceiling": {"images_per_s_per_core": {"median": 500.0}}, "cores": 2}
    plain = {**r, "results": [row for row in rows if not row["rand_augment"]]}
    assert goals.loader_verdicts(r, False, "512 px") == goals.loader_verdicts(plain, False, "512 px")
    assert goals.loader_verdicts(r, False, "512 px")[0].measured == "1.50x"


class Fake:
    """A loader that logs (name, epoch, batch) of every batch it yields, and seeks as the contract says."""

    def __init__(self, name: str, log: list, batches: int = 12):
        self.name, self.log, self.batches, self.epoch, self.start = name, log, batches, 0, 0

    def __len__(self):
        return self.batches

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        for batch in range(self.start, self.batches):
            self.log.append((self.name, self.epoch, batch))
            yield torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.int64)


def test_the_pair_alternates_its_windows_and_lets_the_other_loader_settle(monkeypatch):
    """Windows off, on | on, off | off, on (ABBA), each on an epoch of its own, a settle before every one; the
    epoch boundary and the starts are the off loader's alone."""
    log, settles = [], []
    monkeypatch.setattr(loaders, "build_loader", lambda *a, rand_augment=None, **k:
                        Fake("on" if rand_augment is not None else "off", log))
    monkeypatch.setattr(loaders, "settle", lambda seconds: settles.append(seconds) or log.append("settle"))
    args = loaders.parse_args(["--data", "unused", "--batch-size", "4", "--warmup", "1", "--device", "cpu",
                               "--batches", "3", "--repeats", "3", "--boundaries", "1", "--starts", "1",
                               "--rand-augment", SPEC])
    off, on = loaders.measure_pair("fake", Path("unused"), workers=1, device=torch.device("cpu"), args=args,
                                   options=None, rand_augment=args.rand_augment_spec)
    timed = []  # (loader, epoch) of each run of batches, in order, and the settles between them
    for event in log:
        entry = event if event == "settle" else event[:2]
        if not timed or entry == "settle" or timed[-1] != entry:
            timed.append(entry)
    assert timed == [("off", 0), ("on", 0), "settle",  # the warm-ups (epoch 0), then one settle
                     ("off", 1), "settle", ("on", 2), "settle", ("on", 3), "settle",  # windows, ABBA
                     ("off", 4), "settle", ("off", 5), "settle", ("on", 6), "settle",
                     ("off", 7), ("off", 8),  # the boundary: the end of epoch 7, the start of 8
                     ("off", 9), ("off", 10), ("off", 11)]  # first batches at 0, 50 and 90 %
    assert settles[0] == loaders.SETTLE_MAX_S and all(0 <= s <= loaders.SETTLE_MAX_S for s in settles)
    assert on["window_batches"] == off["window_batches"] == [3, 3, 3]
    assert "epoch_boundary_ms" in off and "epoch_boundary_ms" not in on


@pytest.mark.parametrize("argv,message", [
    (["--rand-augment", "rand-m9-inc0"], "only timm's increasing operation set"),
    (["--rand-augment", "augmix-m5"], "expected timm's form"),
    (["--rand-augment", SPEC, "--views", "2"], "for --views 1"),
])
def test_a_bad_rand_augment_is_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        loaders.parse_args(["--data", "unused", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_projection_is_the_hand_computation():
    """vit_b16_fast: 30 epochs, 128 px x 6, 160 x 5, 192 x 7, 224 x 12 (the preset's header says so); each epoch
    1,153,051 images at its size's rate."""
    fast, seed = load_config("vit_b16_fast"), load_config("vit_b16_seed")
    assert resolution.epoch_sizes(fast) == [128] * 6 + [160] * 5 + [192] * 7 + [224] * 12
    assert resolution.epoch_sizes(seed) == [224] * 30
    assert resolution.measured_sizes(fast) == [128, 160, 192, 224] and resolution.measured_sizes(seed) == [224]
    rates = {128: 40.0, 160: 25.0, 192: 20.0, 224: 10.0}  # images/s
    ramped = resolution.project(resolution.epoch_sizes(fast), rates)
    plain = resolution.project(resolution.epoch_sizes(seed), {224: 10.0})
    # by hand: 6/40 + 5/25 + 7/20 + 12/10 = 0.15 + 0.2 + 0.35 + 1.2 = 1.9 epoch-seconds per image/s; 30/10 = 3
    assert ramped["train_s"] == pytest.approx(1_153_051 * 1.9) == pytest.approx(2_190_796.9)
    assert plain["train_s"] == pytest.approx(3_459_153.0)
    assert ramped["train_s"] / plain["train_s"] == pytest.approx(1.9 / 3)
    assert ramped["epochs_at"] == {"128": 6, "160": 5, "192": 7, "224": 12} and ramped["epochs"] == 30
    assert ramped["seconds_at"]["224"] == pytest.approx(12 * 1_153_051 / 10.0)
    assert ramped["train_h"] == pytest.approx(ramped["train_s"] / 3600)
    assert resolution.IMAGENET_TRAIN_IMAGES == 1_153_051


def test_resolution_benchmark_end_to_end(tmp_path):
    """The tiny ViT with a 24 -> 32 px ramp (tiny_cpu_deit) beside tiny_cpu at 32 px: a row per (preset, size),
    interleaved rounds, the projection from the rows' own medians, and the report's section."""
    assert resolution.main(["--preset", "tiny_cpu_deit", "--compare", "tiny_cpu", "--batch-size", "4", "--steps", "1",
                            "--repeats", "2", "--warmup", "1", "--device", "cpu", "--results", str(tmp_path)]) == 0
    r = only_record(tmp_path, "resolution")
    assert r["benchmark"] == "resolution" and r["cores"] and r["versions"]["torch"] and r["commit"]
    assert r["note"].startswith("CPU figures rank the sizes") and r["imagenet_train_images"] == 1_153_051
    rows = {(row["preset"], row["size"]): row for row in r["results"]}
    assert set(rows) == {("tiny_cpu_deit", 24), ("tiny_cpu_deit", 32), ("tiny_cpu", 32)}
    for row in rows.values():
        s = row["images_per_s"]
        assert len(s["repeats"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
        assert row["batch_size"] == 4 and row["precision"] == "fp32" and row["train_gflops_per_image"] > 0
        assert row["step_ms"]["repeats"] == pytest.approx([1e3 * 4 / rate for rate in s["repeats"]])  # 1 step
    assert rows["tiny_cpu_deit", 24]["tokens"] == 36 and rows["tiny_cpu_deit", 32]["tokens"] == 64  # patch 4
    # fewer tokens, fewer FLOPs: the ramp's point
    assert rows["tiny_cpu_deit", 24]["train_gflops_per_image"] < rows["tiny_cpu_deit", 32]["train_gflops_per_image"]
    assert rows["tiny_cpu_deit", 32]["vs_final_size"] == 1.0
    runs = {run["preset"]: run for run in r["projection"]}
    rate = {key: row["images_per_s"]["median"] for key, row in rows.items()}
    # tiny_cpu_deit: 8 epochs, 24 px for epochs 0-1 and 32 px for 2-7; tiny_cpu: 6 epochs at 32 px
    assert runs["tiny_cpu_deit"]["epochs_at"] == {"24": 2, "32": 6}
    deit = 1_153_051 * (2 / rate["tiny_cpu_deit", 24] + 6 / rate["tiny_cpu_deit", 32])
    plain = 1_153_051 * 6 / rate["tiny_cpu", 32]
    assert runs["tiny_cpu_deit"]["train_s"] == pytest.approx(deit)
    assert runs["tiny_cpu"]["train_s"] == pytest.approx(plain)
    assert runs["tiny_cpu_deit"]["vs"]["tiny_cpu"] == pytest.approx(deit / plain)
    md = next(tmp_path.glob("resolution-*.md")).read_text()
    assert "| tiny_cpu_deit | 24 | 36 | 4 | fp32 |" in md and "| tiny_cpu_deit | 24 x 2, 32 x 6 |" in md
    assert f"| {runs['tiny_cpu_deit']['vs']['tiny_cpu']:.3f} |" in md and "do not predict a GPU" in md
    text = report.render([r], tmp_path / "report.md")
    assert "### Progressive resolution" in text and "| tiny_cpu | 32 x 6 |" in text
    assert any(name.startswith("projected ImageNet training of tiny_cpu_deit") for name in report.figures(r))


def test_a_failing_rand_augment_costs_only_its_own_row(converted, tmp_path, monkeypatch):
    """The pair fails (RandAugment broken): the failure is recorded under the on row's label, the loader is still
    measured off, and the exit status says so."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected")
    monkeypatch.setattr(loaders, "measure_pair", broken)
    figures = {"images_per_s": {"median": 100.0, "min": 100.0, "max": 100.0, "stdev": 0.0, "repeats": [100.0]},
               "epoch_batches": 6, "warmup_s": 0.1}
    monkeypatch.setattr(loaders, "measure", lambda kind, *args, **kwargs: figures)
    assert loaders.main(["--data", str(converted[0]), "--kinds", "dali", "--workers", "1", "--device", "cpu",
                         "--rand-augment", SPEC, "--results", str(tmp_path)]) == 1
    r = only_record(tmp_path, "loaders")
    assert [(row["label"], row["rand_augment"]) for row in r["results"]] == [("dali", None)]
    assert r["failed"] == [{"label": f"dali + {SPEC}", "workers": 1, "error": "RuntimeError: injected"}]
