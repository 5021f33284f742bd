"""training/run.py on the CPU: learning with each loader, exact resume, signals, NaN, bad config, DDP over
gloo, checkpoints that timm loads. The tiny_cpu preset at 32 px on the quirky sample (6 classes, ~160 train
images) trains an epoch in about 2 s; torch.compile is exercised by one test (it takes ~50 s here)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from pipelines.formats.manifest import load_manifest
from training import checkpoint
from training.config import load_config
from training.run import main

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def args(converted, run_dir, *extra, loader="torchvision", epochs=2):
    return ["--preset", "tiny_cpu", "--data", str(converted[0]), "--loader", loader, "--epochs", str(epochs),
            "--batch-size", "16", "--workers", "1", "--out", str(run_dir.parent), "--name", run_dir.name, *extra]


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("loader", ["dali", "ffcv", "torchvision"])
def test_the_tiny_model_learns_with_each_loader(converted, tmp_path, loader):
    """6 classes: chance is 17 %. After 4 epochs every loader has measured 70-100 % on the 20 holdout
    images; 50 % (10 of 20) leaves room for the decoders' small differences and still fails a model
    that learns nothing, or a loader whose labels do not match its images."""
    if loader in LIBRARY:
        pytest.importorskip(LIBRARY[loader])
    run = tmp_path / loader
    assert main(args(converted, run, loader=loader, epochs=4)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["holdout"]["samples"] == converted[1]["splits"]["holdout"]["samples"]
    assert summary["final"]["holdout"]["top1"] >= 0.5, summary
    assert summary["best"]["top1"] >= summary["final"]["holdout"]["top1"] - 1e-9
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in run.iterdir()}


def test_synthetic_eval_scores_chance(converted, tmp_path):
    """The synthetic loader's eval batches are not its train batch: memorizing it must not look like learning."""
    run = tmp_path / "synthetic"
    assert main(args(converted, run, loader="synthetic", epochs=3)) == 0
    assert json.loads((run / "summary.json").read_text())["final"]["holdout"]["top1"] < 0.6


class CountingLoader:
    """A train loader that counts the batches it yields: a resumed run must not read the ones it trained."""

    def __init__(self, inner, counts):
        self.inner, self.counts = inner, counts

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch, start_batch=0):
        self.inner.set_epoch(epoch, start_batch)

    def __iter__(self):
        for batch in self.inner:
            self.counts.append(1)
            yield batch


# DeiT's pieces, each of which draws or carries state a resume must restore: RandAugment (drawn per batch
# position), erasing and mixup/cutmix (reseeded per step), drop path (torch's RNG), the EMA (saved), the ramp.
DEIT = ["--set", "augment.rand_augment=rand-m9-mstd0.5-inc1", "--set", "augment.mixup=0.8", "--set",
        "augment.cutmix=1.0", "--set", "augment.erasing=0.25", "--set", "model.drop_path_rate=0.1", "--set",
        "train.ema_decay=0.9", "--set", "data.ramp={start_size: 24, start_epoch: 0, end_epoch: 1, step: 8}"]


@pytest.mark.parametrize("loader,recipe", [("torchvision", []), ("dali", []), ("torchvision", DEIT)],
                         ids=["torchvision", "dali", "torchvision-deit"])
def test_resume_mid_epoch_continues_exactly(converted, tmp_path, monkeypatch, loader, recipe):
    """Straight: 2 epochs. Interrupted: stop after step 13 (mid-epoch 2: 10 steps an epoch), then --resume.
    Both loaders make a batch's augmentation a function of its place in the run (torchvision seeds each sample
    from (seed, epoch, index), dali's index reader draws on the host from (seed, epoch, rank, batch)) and the
    resumed run seeks past the batches already trained, reading only the 7 left; model, optimizer, scheduler
    and RNG come back from the checkpoint. fp32 CPU kernels with the same threads are deterministic, so the
    losses and weights must agree to float32 rounding (rtol 1e-5 only absorbs a different summation order)."""
    if loader in LIBRARY:
        pytest.importorskip(LIBRARY[loader])
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(args(converted, straight, "--set", "train.log_every=1", *recipe, loader=loader)) == 0
    assert main(args(converted, interrupted, "--set", "train.log_every=1", "--set", "train.stop_at_step=13",
                     *recipe, loader=loader)) == 0
    saved = checkpoint.load(interrupted / "checkpoints" / "last.pt")
    assert saved["position"]["step"] == 13 and saved["position"]["batch"] > 0  # mid-epoch
    import training.run
    build, read = training.run.build_loader, []
    monkeypatch.setattr(training.run, "build_loader", lambda *a, train, **kw: CountingLoader(
        build(*a, train=train, **kw), read) if train else build(*a, train=train, **kw))
    assert main(["--resume", str(interrupted)]) == 0
    steps = len(records(straight, "train"))
    assert len(read) == steps - 13  # the batches of the steps left, none of those trained before the stop

    def losses(run):
        return {r["step"]: r["loss"] for r in records(run, "train")}
    a, b = losses(straight), losses(interrupted)
    assert sorted(a) == sorted(b) and len(a) > 13
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    for weights in ("model", "model_ema") if recipe else ("model",):
        wa = checkpoint.load(straight / "checkpoints" / "last.pt")[weights]
        wb = checkpoint.load(interrupted / "checkpoints" / "last.pt")[weights]
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa), weights


def test_sigterm_mid_epoch_saves_a_resumable_checkpoint(converted, tmp_path):
    run = tmp_path / "term"
    cmd = [sys.executable, str(ROOT / "training/run.py"), *args(converted, run, "--set", "train.log_every=1",
                                                                  epochs=20)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and records(run, "train")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "resume with: python training/run.py --resume" in output
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert saved["position"]["epoch"] < 20 and saved["position"]["step"] >= 1
    assert main(["--resume", str(run), "--epochs", str(saved["position"]["epoch"] + 1)]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == saved["position"]["epoch"] + 1


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(converted, tmp_path, monkeypatch, capsys):
    """A NaN at the 12th training loss (epoch 2): the run exits 1, says why, and leaves epoch 1's checkpoint
    as it was. (Evaluation's losses, computed without gradients, are not counted.)"""
    import training.loop as loop
    real, calls = loop.F.cross_entropy, {"n": 0}

    def poisoned(*a, **kw):
        loss = real(*a, **kw)
        if not torch.is_grad_enabled():
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 12 else loss
    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    run = tmp_path / "nan"
    assert main(args(converted, run, epochs=3)) == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "loss became nan" in message and "last good checkpoint" in message
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    steps_per_epoch = converted[1]["splits"]["train"]["samples"] // 16
    assert steps_per_epoch < 12 and saved["position"] == {"epoch": 1, "batch": 0, "step": steps_per_epoch}
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


class FailingLoader(CountingLoader):
    """A train loader whose batch `at` raises `error`, as a loader's wrapper raises a data fault or an
    out-of-memory."""

    def __init__(self, inner, at, error):
        super().__init__(inner, [])
        self.at, self.error = at, error

    def __iter__(self):
        for index, batch in enumerate(self.inner):
            if index == self.at:
                raise self.error
            yield batch


@pytest.mark.parametrize("kind", ["data", "memory"])
def test_a_loader_error_mid_run_stops_with_its_message_and_keeps_the_checkpoint(converted, tmp_path, monkeypatch,
                                                                                capsys, kind):
    """A data fault (DatasetError, naming the file) or the device out of memory (DeviceOutOfMemory, saying what
    to lower) in epoch 2: exit 1 with the loader's message on one line, epoch 1's checkpoint kept, no traceback."""
    from pipelines.formats.manifest import DatasetError
    from pipelines.loaders.errors import DeviceOutOfMemory
    error = DatasetError("shard-000001.tar: sample 7 does not decode; convert again") if kind == "data" else \
        DeviceOutOfMemory("out of memory while reading split 'train'. The data is fine: lower data.batch_size")
    import training.run
    real_train_epoch = training.run.train_epoch

    def second_epoch_fails(step, batches, state, **kwargs):
        return real_train_epoch(step, FailingLoader(batches, at=2, error=error) if state.epoch == 1 else batches,
                                state, **kwargs)
    monkeypatch.setattr(training.run, "train_epoch", second_epoch_fails)
    run = tmp_path / kind
    assert main(args(converted, run, loader="synthetic", epochs=3)) == 1
    err = capsys.readouterr().err
    assert str(error).split(";")[0].split(".")[0] in " ".join(err.split()) and "Traceback" not in err
    assert checkpoint.load(run / "checkpoints" / "last.pt")["position"]["epoch"] == 1


@pytest.mark.parametrize("extra,message", [
    (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--set", "optim.lr=fast"], "optim.lr: expected float"),
    (["--set", "train.epochs=2.5"], "train.epochs: expected int"),
    (["--set", "data.loader=tfrecord"], "data.loader: 'tfrecord' is not one of"),
    (["--set", "optim"], "not KEY=VALUE"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_config_is_an_error_that_names_it(converted, tmp_path, capsys, extra, message):
    assert main(args(converted, tmp_path / "bad", *extra)) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["--preset", "tiny_cpu", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in " ".join(capsys.readouterr().err.split())


def test_checkpoint_loads_into_timm(converted, tmp_path):
    import timm
    run = tmp_path / "timm"
    assert main(args(converted, run, epochs=1)) == 0
    for name in ("last.pt", "best.pt"):
        saved = torch.load(run / "checkpoints" / name, weights_only=True)
        kwargs = saved["config"]["model"]["kwargs"]
        model = timm.create_model(saved["config"]["model"]["name"], num_classes=saved["num_classes"], **kwargs)
        model.load_state_dict(saved["model"])  # strict: every key under timm's names


def test_two_process_gloo_ddp_covers_the_data(converted, tmp_path):
    """torchrun, 2 CPU processes: each rank trains half of each epoch's permutation (168 train images -> 84
    per rank -> 5 steps of 16), the holdout is evaluated once across the ranks, and only rank 0 writes. The run
    saves a mid-epoch checkpoint at every log window (the ranks agree on the step through the window's
    all-reduce), stops after step 3 and is resumed under torchrun."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                str(ROOT / "training/run.py")]
    every_step = ["--set", "train.log_every=1", "--set", "train.checkpoint_every_min=1e-6"]
    for extra in ([*args(converted, run, *every_step, "--set", "train.stop_at_step=3", epochs=1)],
                  ["--resume", str(run), "--set", "train.stop_at_step=0"]):
        done = subprocess.run(torchrun + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if "--resume" not in extra:
            saved = checkpoint.load(run / "checkpoints" / "previous.pt")
            assert saved["position"] == {"epoch": 0, "batch": 2, "step": 2}  # a mid-epoch one, from rank 0
            assert checkpoint.load(run / "checkpoints" / "last.pt")["position"]["step"] == 3
    assert "resuming" in done.stderr and "at epoch 0, batch 3" in " ".join(done.stderr.split())
    summary = json.loads((run / "summary.json").read_text())
    manifest = load_manifest(converted[0])
    assert summary["final"]["holdout"]["samples"] == manifest["splits"]["holdout"]["samples"]
    assert summary["steps"] == (manifest["splits"]["train"]["samples"] // 2) // 16
    assert len(records(run, "eval")) == len(summary["final"])  # one writer: no rank 1 lines


@pytest.mark.parametrize("precision,model", [("bf16", None), ("fp16", None), ("fp32", "resnet18")])
def test_other_precisions_and_timm_models_train(converted, tmp_path, precision, model):
    """bf16 autocast, fp16 with GradScaler, and a timm model that takes no img_size (a ResNet)."""
    run = tmp_path / precision
    extra = ["--precision", precision] + (["--model", model, "--set", "model.kwargs={}"] if model else [])
    assert main(args(converted, run, *extra, epochs=1)) == 0
    train, summary = records(run, "train"), json.loads((run / "summary.json").read_text())
    assert train and train[-1]["step"] == summary["steps"] and all(0 < r["loss"] < 20 for r in train), train
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert saved["config"]["train"]["precision"] == precision
    assert (model is None) or any(k.startswith("layer1.") for k in saved["model"])


def test_compiled_training_runs(converted, tmp_path):
    """torch.compile on the CPU (~50 s): the compiled module trains, the plain one is saved and evaluated."""
    run = tmp_path / "compiled"
    assert main(args(converted, run, "--set", "model.compile=true", epochs=1)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["holdout"]["samples"] > 0 and records(run, "train")[-1]["loss"] < 10
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in saved["model"])


def test_compiled_evaluation_builds_two_graphs_and_is_never_the_training_module():
    """model.compile_eval: full eval batches get one graph and the last, smaller batch one more (a dynamic batch
    size, not one graph per remainder), in eval mode, and the results equal the uncompiled module's. Off, the
    plain module is evaluated."""
    from torch._dynamo.testing import CompileCounter

    from training.loop import evaluate
    from training.model import compile_for_evaluation
    torch._dynamo.reset()
    counter = CompileCounter()
    config = load_config("tiny_cpu", ["model.compile=true", "model.compile_eval=true"]).model
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=4, depth=1)
    assert compile_for_evaluation(model, load_config("tiny_cpu").model) is model
    compiled = compile_for_evaluation(model, config, backend=counter)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (8, 8, 8, 5, 3)]
    for _ in range(2):  # a second evaluation compiles nothing more
        results = evaluate(compiled, batches, num_classes=4, autocast=contextlib.nullcontext)
    assert counter.frame_count == 2
    plain = evaluate(model, batches, num_classes=4, autocast=contextlib.nullcontext)
    assert {k: results[k] for k in ("top1", "top5", "samples")} == {k: plain[k] for k in ("top1", "top5", "samples")}
    assert results["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    torch._dynamo.reset()


def test_presets_hold_only_what_differs_from_the_defaults():
    """config.py's rule for presets: a key whose value equals its default does not belong in one."""
    import yaml

    from training.config import PRESETS, Config

    def repeated(values: dict, defaults: dict, where: str):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(defaults[key], dict) and key not in ("kwargs", "options"):
                yield from repeated(value, defaults[key], f"{where}{key}.")
            elif value == defaults[key]:
                yield f"{where}{key}"

    defaults = Config().to_dict()
    found = {p.name: list(repeated(yaml.safe_load(p.read_text()) or {}, defaults, "")) for p in PRESETS.glob("*.yaml")}
    assert not any(found.values()), found


def test_every_flag_sets_its_field():
    """run.py's FLAGS table: each flag's typed value lands in its config field (a --name of digits stays text)."""
    from training.run import FLAGS, parse_args, resolve_config
    given = {"--loader": "synthetic", "--data": "d", "--model": "resnet18", "--epochs": "2", "--batch-size": "4",
             "--lr": "0.5", "--image-size": "64", "--device": "cpu", "--precision": "fp16", "--workers": "3",
             "--out": "o", "--name": "123", "--objective": "rotation", "--init": "i", "--finetune": "linear",
             "--freeze-blocks": "1"}
    assert set(given) == {flag for flag, *_ in FLAGS}
    config, _, _ = resolve_config(parse_args([part for item in given.items() for part in item]), print)
    for flag, field_name, kind, _ in FLAGS:
        section, key = field_name.split(".")
        assert getattr(getattr(config, section), key) == kind(given[flag]), flag


def test_a_saved_config_with_a_retired_field_still_loads():
    """Runs saved before run.resume was removed hold `run: {resume: ''}` in config.yaml and their checkpoints."""
    from training.config import Config, config_from_dict
    saved = Config().to_dict()
    saved["run"]["resume"] = ""
    assert config_from_dict(saved).to_dict() == Config().to_dict()
