"""benchmarks/train_step.py's measurement (windows inside epochs, peak memory per row, the compile and AdamW
sweeps), the trainer's model.compile_mode and optim.fused, and benchmarks/record.py's record of an edited tree.
The step itself is replaced by a counter where only the placement and the bookkeeping are under test; one test
compiles (~50 s on 2 cores)."""
import json
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from benchmarks import record, train_step
from pipelines.loaders.synthetic import SyntheticLoader
from training import optim
from training.config import OptimConfig, load_config
from training.objectives import build_network, build_objective
from training.run import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def bench_args(converted, results, *extra):
    return ["--data", str(converted[0]), "--preset", "tiny_cpu", "--kinds", "synthetic", "--batch-size", "8",
            "--steps", "2", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--results", str(results), *extra]


def only_record(directory: Path) -> dict:
    (path,) = directory.glob("train_step-*.json")
    return json.loads(path.read_text())


class Log:
    """Batches yielded (epoch, index), set_epoch calls and the benchmark's device syncs, in order."""

    def __init__(self):
        self.events = []

    def windows(self) -> list[list[tuple[int, int]]]:
        """The batches read between each pair of syncs after the warm-up: the timed windows. The syncs come
        in pairs around the warm-up and around every window; between a pair's end and the next pair's start
        lie the untimed lead steps."""
        return self.segments()[3::2]

    def leads(self) -> list[list[tuple[int, int]]]:
        """The untimed batches before each window (after the warm-up's last sync, before the window's first)."""
        return self.segments()[2::2][:len(self.windows())]

    def segments(self) -> list[list[tuple[int, int]]]:
        """[before the warm-up, warm-up, lead 1, window 1, lead 2, window 2, ...]"""
        segments, current = [], []
        for event in self.events:
            if event == "sync":
                segments.append(current)
                current = []
            elif event[0] == "batch":
                current.append(event[1:])
        return segments


class LoggingLoader:
    """The synthetic loader (which honours set_epoch(epoch, start_batch)), logging what it is asked and yields."""

    def __init__(self, batches: int, log: Log):
        self.inner = SyntheticLoader(batches=batches, batch_size=2, image_size=8, num_classes=3,
                                     device=torch.device("cpu"), dtype=torch.float32, seed=0, train=True)
        self.log, self.epoch = log, None

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch, start_batch=0):
        self.log.events.append(("set_epoch", epoch, start_batch))
        self.epoch, self.start = epoch, start_batch
        self.inner.set_epoch(epoch, start_batch)

    def __iter__(self):
        for index, batch in enumerate(self.inner, start=self.start):
            self.log.events.append(("batch", self.epoch, index))
            yield batch


@pytest.fixture
def counted_steps(monkeypatch):
    """train_step replaced by a counter: the benchmark's placement and bookkeeping without the model's time."""
    steps = []
    monkeypatch.setattr(train_step, "train_step", lambda step, images, labels: steps.append(images.shape[0]))
    return steps


def measured(epoch_batches: int, *, steps: int, repeats: int, warmup: int, monkeypatch) -> tuple[dict, Log]:
    log = Log()
    monkeypatch.setattr(train_step, "sync", lambda device: log.events.append("sync"))
    cursor = train_step.EpochCursor(LoggingLoader(epoch_batches, log))
    result = train_step.measure(None, cursor, torch.device("cpu"),
                                Namespace(steps=steps, repeats=repeats, warmup=warmup))
    return result, log


@pytest.mark.parametrize("warmup", [0, 1, 4, 7])
def test_windows_never_cross_an_epoch(monkeypatch, counted_steps, warmup):
    """Epochs of 7 batches, windows of 3: a window follows the warm-up in its epoch when the rest holds it, and
    otherwise starts the next epoch at batch 0, with LEAD untimed steps before the clock. Reading across epochs
    (the benchmark once did) puts an epoch boundary in most of these windows."""
    result, log = measured(7, steps=3, repeats=4, warmup=warmup, monkeypatch=monkeypatch)
    windows, leads = log.windows(), log.leads()
    assert len(windows) == 4 and result["window"]["steps"] == 3 and not result["window"]["short_epoch"]
    for window, lead, (epoch, first) in zip(windows, leads, result["window"]["starts"]):
        assert window == [(epoch, first + i) for i in range(3)]  # one epoch, consecutive batches
        assert first > 0  # an epoch's first batch, which carries its start, is never timed
        # a window that starts an epoch has the lead before it; one that continues an epoch needs none
        assert lead == ([(epoch, i) for i in range(train_step.LEAD)] if first == train_step.LEAD else [])
    assert result["window"]["epoch_starts_timed"] == 0
    epochs = [e for e in log.events if e != "sync" and e[0] == "set_epoch"]
    assert epochs == [("set_epoch", n, 0) for n in range(len(epochs))]  # each epoch once, from its start
    assert len(counted_steps) == warmup + sum(map(len, windows)) + sum(map(len, leads))


def test_an_epoch_shorter_than_a_window_shortens_it_and_says_so(monkeypatch, counted_steps):
    """Epochs of 5 batches, 30 steps asked: windows of 3 (5 less the 2-step lead), each in an epoch of its own."""
    result, log = measured(5, steps=30, repeats=3, warmup=6, monkeypatch=monkeypatch)
    window = result["window"]
    assert window["short_epoch"] and window["steps"] == 5 - train_step.LEAD and window["epoch_batches"] == 5
    assert all(len({epoch for epoch, _ in w}) == 1 and len(w) == 3 for w in log.windows())
    assert window["epoch_starts_timed"] == 0


def test_a_one_batch_epoch_times_its_start_and_counts_it(monkeypatch, counted_steps):
    result, _ = measured(1, steps=3, repeats=2, warmup=1, monkeypatch=monkeypatch)
    assert result["window"]["steps"] == 1 and result["window"]["epoch_starts_timed"] == 2


class FakePeak:
    """PeakMemory with a fake device peak: the train steps taken since the last reset."""

    def __init__(self, steps: list):
        self.steps, self.since, self.events = steps, 0, []

    def __call__(self, device):
        return self

    def reset(self):
        self.since = len(self.steps)
        self.events.append("reset")

    def read(self):
        self.events.append("read")
        return float(len(self.steps) - self.since)


def test_peak_memory_is_each_rows_own(converted, tmp_path, monkeypatch, counted_steps):
    """Two rows after one another (default and fused AdamW): each row's peak is read from a counter reset
    before it, so the second row's figure holds only its own steps, not the first row's as well."""
    fake = FakePeak(counted_steps)
    monkeypatch.setattr(train_step, "PeakMemory", fake)
    assert train_step.main(bench_args(converted, tmp_path, "--fused", "false", "true")) == 0
    rows = only_record(tmp_path)["results"]
    assert fake.events == ["reset", "read"] * 2
    assert [r["fused"] for r in rows] == [False, True]
    assert rows[0]["peak_memory_gib"] > 0 and rows[1]["peak_memory_gib"] == rows[0]["peak_memory_gib"]
    assert len(counted_steps) > rows[1]["peak_memory_gib"]


def test_cpu_rows_have_no_peak_memory(converted, tmp_path, counted_steps):
    assert train_step.PeakMemory(torch.device("cpu")).read() is None
    assert train_step.main(bench_args(converted, tmp_path)) == 0
    (row,) = only_record(tmp_path)["results"]
    assert "peak_memory_gib" not in row and row["compile_mode"] == "none" and row["fused"] is False


def test_each_row_records_its_compile_mode_and_adamw(converted, tmp_path, monkeypatch, counted_steps):
    """The sweep is the product of --compile-mode and --fused; each row says which it ran, and the optimizer it
    trained with was the one it says (fused or torch's default)."""
    built = []
    real = train_step.build_optimizer
    monkeypatch.setattr(train_step, "build_optimizer",
                        lambda model, config: built.append(real(model, config)) or built[-1])
    compiled = []
    monkeypatch.setattr(train_step, "compile_for_training",
                        lambda module, config: compiled.append((config.compile, config.compile_mode)) or module)
    assert train_step.main(bench_args(converted, tmp_path, "--compile-mode", "none", "reduce-overhead",
                                      "--fused", "true", "false")) == 0
    r = only_record(tmp_path)
    assert [(row["compile_mode"], row["fused"]) for row in r["results"]] == [
        ("none", True), ("none", False), ("reduce-overhead", True), ("reduce-overhead", False)]
    assert compiled == [(False, "default"), (True, "reduce-overhead")]
    assert [bool(o.param_groups[0]["fused"]) for o in built] == [True, False, True, False]
    assert r["settings"]["compile_modes"] == ["none", "reduce-overhead"] and r["settings"]["fused_options"] == [True, False]
    assert all(row["vs_synthetic"] == 1.0 for row in r["results"])  # each against its own synthetic row
    md = next(tmp_path.glob("train_step-*.md")).read_text()
    assert "| synthetic | 8 | reduce-overhead | yes |" in md


def test_no_compile_and_a_compile_mode_conflict(converted, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train_step.main(bench_args(converted, tmp_path, "--no-compile", "--compile-mode", "default"))
    assert exit_.value.code == 2


def test_the_benchmark_compiles_in_default_mode(converted, tmp_path):
    """torch.compile in model.compile_mode 'default' trains in the benchmark (~50 s on 2 cores): the one compile
    of these tests."""
    assert train_step.main(bench_args(converted, tmp_path, "--compile-mode", "default", "--steps", "1",
                                      "--repeats", "1")) == 0
    (row,) = only_record(tmp_path)["results"]
    assert row["compile_mode"] == "default" and row["images_per_s"]["median"] > 0
    assert row["warmup_s"] > 0


@pytest.mark.parametrize("extra,message", [
    (["--set", "model.compile_mode=fastest"], "model.compile_mode: 'fastest' is not one of default, reduce-overhead"),
    (["--set", "optim.fused=maybe"], "optim.fused: expected bool"),
])
def test_the_trainer_rejects_a_bad_compile_mode_or_fused(converted, tmp_path, capsys, extra, message):
    assert train_main(["--preset", "tiny_cpu", "--data", str(converted[0]), "--out", str(tmp_path), *extra]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_fused_adamw_on_a_device_without_it_is_a_config_error(converted, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(optim, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    assert train_main(["--preset", "tiny_cpu", "--data", str(converted[0]), "--out", str(tmp_path),
                       "--set", "optim.fused=true"]) == 2
    assert "optim.fused=true: torch has no fused AdamW for 'cpu'" in " ".join(capsys.readouterr().err.split())


def tiny_model():
    config = load_config("tiny_cpu")
    return build_network(config, build_objective(config), 4)


def test_optim_fused_builds_a_fused_adamw_that_steps():
    model = tiny_model()
    fused = optim.build_optimizer(model, OptimConfig(fused=True))
    default = optim.build_optimizer(tiny_model(), OptimConfig())
    assert isinstance(fused, torch.optim.AdamW) and len(fused.param_groups) == 2  # decayed and not decayed
    assert all(group["fused"] is True for group in fused.param_groups)
    assert not any(group["fused"] for group in default.param_groups)
    before = next(model.parameters()).detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    fused.step()  # torch checks the fused kernel's device and dtype here
    assert not torch.equal(before, next(model.parameters()))


def test_fp16_on_a_gpu_always_gets_the_fused_adamw():
    """GradScaler.step reads its found-inf flag back to the host every step unless the optimizer takes it as a
    tensor (torch's fused AdamW alone does): fp16 on CUDA must build that one, whatever optim.fused says; elsewhere
    optim.fused decides."""
    assert optim.uses_fused(OptimConfig(), "cuda", loss_scaling=True)
    assert not optim.uses_fused(OptimConfig(), "cuda", loss_scaling=False)
    assert not optim.uses_fused(OptimConfig(), "cpu", loss_scaling=True)
    assert optim.uses_fused(OptimConfig(fused=True), "cpu", loss_scaling=False)
    scaled = optim.build_optimizer(tiny_model(), OptimConfig(), loss_scaling=True)  # on the CPU: optim.fused
    assert not any(group["fused"] for group in scaled.param_groups)
    assert getattr(torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True),
                   "_step_supports_amp_scaling", False)  # what GradScaler.step looks for


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def clone(tmp_path):
    """A clone of this repository's last commit, to edit (the working tree under test is never touched)."""
    path = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True)
    return path


def test_a_record_of_an_edited_tree_carries_the_diff_that_rebuilds_it(clone, tmp_path, monkeypatch):
    monkeypatch.setattr(record, "ROOT", clone)
    assert record.git_state() == {"commit": git(clone, "rev-parse", "--short", "HEAD").strip(), "diff": None}
    optim_py = clone / "training" / "optim.py"
    optim_py.write_text(optim_py.read_text().replace("lr=config.lr", "lr=config.lr * 2"))
    (clone / "training" / "extra.py").write_text("FACTOR = 2\n")  # a new module, untracked
    (clone / "benchmarks" / "results" / "x-1.json").write_text("{}\n")  # a record: not code
    (clone / "NOTES.md").write_text("docs are not code\n")
    state = record.git_state()
    assert state["commit"].endswith("-dirty")
    assert "lr=config.lr * 2" in state["diff"]
    assert "x-1.json" not in state["diff"] and "NOTES.md" not in state["diff"]
    # the commit plus the diff is the measured code
    rebuilt = tmp_path / "rebuilt"
    subprocess.run(["git", "clone", "-q", str(clone), str(rebuilt)], check=True)
    (tmp_path / "measured.diff").write_text(state["diff"])
    git(rebuilt, "apply", str(tmp_path / "measured.diff"))
    assert (rebuilt / "training" / "optim.py").read_text() == optim_py.read_text()
    assert (rebuilt / "training" / "extra.py").read_text() == "FACTOR = 2\n"


def test_a_record_carries_its_diff_and_the_gpu_fields(clone, tmp_path, monkeypatch):
    monkeypatch.setattr(record, "ROOT", clone)
    (clone / "training" / "optim.py").write_text("# edited\n")
    monkeypatch.setattr(record, "cuda_device", lambda: {"gpu_name": "NVIDIA H200", "gpu_compute_capability": "9.0",
                                                        "gpu_peak_bf16_tflops": record.peak_bf16_tflops("NVIDIA H200")})
    path = record.write_record("probe", {"results": []}, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["commit"].endswith("-dirty") and "+# edited" in saved["diff"]
    assert saved["gpu_compute_capability"] == "9.0" and saved["gpu_peak_bf16_tflops"] == 989.0


def test_the_bf16_peak_is_the_parts_own():
    """The PCIe and NVL parts run slower clocks than the SXM ones their names begin like."""
    assert record.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == record.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert record.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert record.peak_bf16_tflops("NVIDIA H200 NVL") == 835.0
    assert record.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") is None
    if not torch.cuda.is_available():
        assert record.cuda_device() == {}


def test_evaluation_benchmark_times_both_models_and_projects_the_epoch(tmp_path):
    """benchmarks.evaluation with dynamo's eager backend (the plumbing, in seconds): both rows measured, the
    compiled twin's first pass apart, and the projection the arithmetic of the rates."""
    from benchmarks import evaluation
    assert evaluation.main(["--preset", "tiny_cpu", "--backend", "eager", "--batches", "2", "--repeats", "2",
                            "--results", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("evaluation-*.json")
    r = json.loads(path.read_text())
    rows = {row["variant"]: row for row in r["results"]}
    assert set(rows) == {"eager", "compiled"} and all(len(row["pass_s"]["repeats"]) == 2 for row in rows.values())
    assert rows["compiled"]["first_pass_s"] > 0 and r["settings"]["images_per_pass"] == 8 * 2 + 2
    run = r["projection"]
    images = evaluation.HOLDOUT_IMAGES + evaluation.VAL_IMAGES
    for variant, row in rows.items():
        assert run["eval_s_per_epoch"][variant] == pytest.approx(images / row["images_per_s"]["median"])
        assert run["eval_s_per_epoch_with_ema"][variant] == pytest.approx(2 * run["eval_s_per_epoch"][variant])
    assert path.with_suffix(".md").exists()


def test_the_smoke_check_names_every_way_a_run_goes_wrong():
    """benchmarks.smoke's verdict on one loader's two processes: clean runs pass; a failed process, a recompile
    storm (more graphs than sizes, or torch's limit hit), a size the ramp did not plan, a resumed run that ends
    early or without its evaluation each fail with a sentence that says which."""
    from benchmarks import smoke

    def train(epoch, batch, size):
        return {"kind": "train", "epoch": epoch, "batch": batch, "image_size": size, "images_per_s": 100.0 * size,
                "input_wait": 0.01}
    records = [train(0, 5, 24), train(0, 10, 24), train(1, 5, 32), {"kind": "resume"}, train(1, 8, 32), train(1, 10, 32),
               {"kind": "eval"}]
    clean = [{"exit": 0, "recompiles": 1, "limit_hit": False, "sizes": 2, "log": "a"},
             {"exit": 0, "recompiles": 0, "limit_hit": False, "sizes": 1, "log": "b"}]
    summary = {"steps": 20, "final": {"holdout": {}}}
    assert smoke.check("dali", clean, records, summary, {24, 32}) == []
    storm = [dict(clean[0], recompiles=2), clean[1]]
    assert "recompile storm" in " ".join(smoke.check("dali", storm, records, summary, {24, 32}))
    limit = [clean[0], dict(clean[1], limit_hit=True)]
    assert "recompile limit hit" in " ".join(smoke.check("dali", limit, records, summary, {24, 32}))
    failed = [clean[0], dict(clean[1], exit=1)]
    assert "resume process exited with 1" in " ".join(smoke.check("dali", failed, records, summary, {24, 32}))
    assert "the ramp plans [24]" in " ".join(smoke.check("dali", clean, records, summary, {24}))
    assert "ended at step 15" in " ".join(smoke.check("dali", clean, records, {**summary, "steps": 15}, {24, 32}))
    assert "without its evaluation" in " ".join(smoke.check("dali", clean, records, {"steps": 20, "final": {}},
                                                            {24, 32}))
    assert "did not finish" in " ".join(smoke.check("dali", clean, records, None, {24, 32}))
    by_size = smoke.rates(records)  # the first window of each size in each process is left out
    assert by_size == {"24": {"images_per_s": 2400.0, "input_wait": 0.01, "windows": 1},
                       "32": {"images_per_s": 3200.0, "input_wait": 0.01, "windows": 1}}


@pytest.mark.parametrize("objective", ["mae", "colorize"])
def test_the_benchmark_measures_the_self_supervised_objectives(converted, tmp_path, objective):
    """`--objective mae|colorize` trains the objective's own network from synthetic input and from a real loader
    (the batch through the objective's inputs and loss, as the trainer's step sends it), and writes its rows.
    MAE's FLOPs are the masked step's: its encoder sees a quarter of the patches, so one image costs less than
    the supervised step of the same ViT."""
    argv = bench_args(converted, tmp_path, "--objective", objective, "--kinds", "synthetic", "torchvision",
                      "--workers", "1")
    argv[argv.index("tiny_cpu")] = f"tiny_cpu_{objective}"
    assert train_step.main(argv) == 0
    r = only_record(tmp_path)
    rows = {row["kind"]: row for row in r["results"]}
    assert r["settings"]["objective"] == objective and set(rows) == {"synthetic", "torchvision"} and not r["failed"]
    assert all(row["images_per_s"]["median"] > 0 for row in rows.values())
    assert rows["torchvision"]["vs_synthetic"] == pytest.approx(
        rows["torchvision"]["images_per_s"]["median"] / rows["synthetic"]["images_per_s"]["median"])
    config = load_config("tiny_cpu")
    supervised = train_step.train_flops_per_image(build_network(config, build_objective(config), 4),
                                                  build_objective(config), 32, 4, torch.device("cpu"),
                                                  lambda: torch.autocast("cpu", enabled=False))
    flops = rows["synthetic"]["train_flops_per_image"]
    assert (flops < 0.6 * supervised) if objective == "mae" else (0.9 * supervised < flops < 1.1 * supervised)
    assert f", {objective}, 32 px" in next(tmp_path.glob("train_step-*.md")).read_text()
