"""Training runs that lose nothing: real kill -9s at known points (tests/pausing_run.py stops the run there), torn
checkpoints, a disk that refuses a write, a second run into a run's directory, and config mistakes caught
before any work.

The reference is an uninterrupted run of the tiny CPU ViT, 2 epochs of 10 steps, with a log window every 2
steps and a checkpoint at every window (train.checkpoint_every_min far below a window's time). Every
interrupted run, once resumed, must end with its weights (to the resume test's precision), its position and
the same train records in metrics.jsonl.
"""
import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from training import checkpoint
from training.run import main

EVERY_WINDOW = ["--set", "train.log_every=2", "--set", "train.checkpoint_every_min=1e-6"]


def args(converted, run_dir, *extra, epochs=2):
    return ["--preset", "tiny_cpu", "--data", str(converted[0]), "--loader", "torchvision", "--epochs", str(epochs),
            "--batch-size", "16", "--workers", "1", "--out", str(run_dir.parent), "--name", run_dir.name,
            *EVERY_WINDOW, *extra]


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def cli(*arguments):
    """training/run.py in a process of its own; returns its exit code and its stderr on one line."""
    done = subprocess.run([sys.executable, str(ROOT / "training/run.py"), *map(str, arguments)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, " ".join(done.stderr.split())


# Each comparison is between runs of the same kind of process. Fresh processes reproduce each other bit for bit,
# and so do runs inside the pytest process, but the two kinds differ in the last bits (measured: 1e-8 in most
# weights after 20 steps, 1e-4 in the attention's qkv bias, whose key part has a gradient of about 0 that
# AdamW's normalization scales up; not thread counts, not denormal flags). So killed runs are resumed in fresh
# processes and compared with a fresh one.
@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory):
    """The uninterrupted run, in a process of its own."""
    run = tmp_path_factory.mktemp("reference") / "straight"
    code, err = cli(*args(converted, run))
    assert code == 0, err[-3000:]
    return run


@pytest.fixture(scope="module")
def reference_here(converted, tmp_path_factory):
    """The uninterrupted run, in the pytest process."""
    run = tmp_path_factory.mktemp("reference_here") / "straight"
    assert main(args(converted, run)) == 0
    return run


def assert_same_as(run, reference):
    a, b = (checkpoint.load(r / "checkpoints" / checkpoint.LAST) for r in (reference, run))
    assert b["position"] == a["position"]
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-7) for k in a["model"])
    assert [r["step"] for r in records(run, "train")] == [r["step"] for r in records(reference, "train")]
    assert json.loads((run / "summary.json").read_text())["steps"] == a["position"]["step"]


def killed_at(converted, run, point, nth):
    """Starts the run under tests/pausing_run.py and kill -9s its whole process group (the loader's workers
    included) once it has paused at the nth `point`."""
    marker, output = run.parent / f"{run.name}.paused", run.parent / f"{run.name}.log"
    cmd = [sys.executable, str(ROOT / "tests/pausing_run.py"), point, str(nth), str(marker), *args(converted, run)]
    with open(output, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert process.poll() is None, output.read_text()[-3000:]
        assert time.time() < deadline, f"the run never reached {point} {nth}"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("point,nth", [("step", 7), ("evaluate", 1), ("write", 3), ("publish", 4)])
def test_kill_9_anywhere_then_resume_ends_as_an_uninterrupted_run(converted, reference, tmp_path, point, nth):
    """In a step of epoch 1 (after the checkpoints of steps 2, 4, 6), in epoch 1's evaluation, inside the write
    of step 6's checkpoint (half of its bytes on disk) and between step 8's complete temporary file and its
    renames."""
    run = tmp_path / "killed"
    killed_at(converted, run, point, nth)
    saved = checkpoint.load(run / "checkpoints" / checkpoint.LAST)
    assert 0 < saved["position"]["step"] < 10  # mid-epoch 1: the kill lost at most a window
    code, err = cli("--resume", run)
    assert code == 0 and f"resuming {run} at epoch 0, batch {saved['position']['batch']}" in err, err[-3000:]
    assert_same_as(run, reference)
    assert not list((run / "checkpoints").glob("*.tmp"))  # the killed write's leftovers are gone
    superseded = (run / "metrics.superseded.jsonl")
    assert not superseded.exists() or all(json.loads(line)["step"] > saved["position"]["step"]
                                          for line in superseded.read_text().splitlines() if line.startswith("{"))


def test_kill_9_before_the_first_checkpoint_then_resume_starts_over(converted, reference, tmp_path):
    run = tmp_path / "early"
    killed_at(converted, run, "step", 1)
    assert (run / "config.yaml").exists() and not (run / "checkpoints" / checkpoint.LAST).exists()
    code, err = cli("--resume", run)
    assert code == 0 and "has no checkpoint yet" in err, err[-3000:]
    assert_same_as(run, reference)


@pytest.fixture
def stopped(converted, tmp_path):
    """A run stopped at step 14 (stop_at_step 13, honoured at the next window): last.pt at step 14,
    previous.pt at step 12."""
    run = tmp_path / "stopped"
    assert main(args(converted, run, "--set", "train.stop_at_step=13")) == 0
    assert checkpoint.load(run / "checkpoints" / checkpoint.PREVIOUS)["position"]["step"] == 12
    return run


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
          "empty": lambda p: p.write_bytes(b""),
          "flipped": flip_middle_byte,
          "a best.pt": lambda p: shutil.copyfile(p.with_name(checkpoint.BEST), p)}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_last_pt_falls_back_to_previous_pt(stopped, reference_here, capsys, damage):
    last = stopped / "checkpoints" / checkpoint.LAST
    DAMAGE[damage](last)
    with pytest.raises(checkpoint.CheckpointError, match=str(last)):
        checkpoint.load(last, checkpoint.RESUME_KEYS)
    capsys.readouterr()
    assert main(["--resume", str(stopped), "--set", "train.stop_at_step=0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{last}" in err and f"resuming from {stopped / 'checkpoints' / checkpoint.PREVIOUS} (step 12)" in err
    assert_same_as(stopped, reference_here)


def test_no_complete_checkpoint_left_is_an_error_that_names_them(stopped, capsys):
    folder = stopped / "checkpoints"
    DAMAGE["truncated"](folder / checkpoint.LAST)
    DAMAGE["empty"](folder / checkpoint.PREVIOUS)
    capsys.readouterr()
    assert main(["--resume", str(stopped)]) == 2
    err = one_line(capsys)
    assert str(folder / checkpoint.LAST) in err and f"{folder / checkpoint.PREVIOUS} is empty" in err
    DAMAGE["flipped"](folder / checkpoint.BEST)  # a named file is used as it is, or not at all
    assert main(["--resume", str(folder / checkpoint.BEST)]) == 2
    err = one_line(capsys)
    assert str(folder / checkpoint.BEST) in err and ("is corrupt" in err or "cannot be read" in err)


def test_a_failed_write_stops_the_run_and_keeps_the_last_good_checkpoint(converted, reference_here, tmp_path, capsys,
                                                                         monkeypatch):
    """The disk fills up during the third checkpoint write (step 6): the run stops with exit 1 and a message
    naming the file, last.pt is still step 4's byte for byte, and --resume then finishes the run."""
    run, real_save, calls, kept = tmp_path / "full", torch.save, {"n": 0}, {}
    last = run / "checkpoints" / checkpoint.LAST

    def filling_up(state, f):
        calls["n"] += 1
        if calls["n"] != 3:
            return real_save(state, f)
        kept["bytes"] = last.read_bytes()
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint.torch, "save", filling_up)
    assert main(args(converted, run)) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"could not write the checkpoint {last}: No space left on device ({last} is unchanged)" in err
    assert f"--resume {run}" in err
    assert last.read_bytes() == kept["bytes"] and not list(last.parent.glob("*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["--resume", str(run)]) == 0
    assert_same_as(run, reference_here)


def test_a_file_size_limit_from_the_kernel_stops_the_run_cleanly(converted, tmp_path):
    """A real write error: RLIMIT_FSIZE at 4 MB makes the kernel refuse the first checkpoint (the tiny ViT's is
    ~24 MB) with EFBIG, as a full disk refuses with ENOSPC. No checkpoint, and no half-written one, is left."""
    run = tmp_path / "limited"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
    done = subprocess.run([sys.executable, str(ROOT / "training/run.py"), *args(converted, run)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert f"could not write the checkpoint {run / 'checkpoints' / checkpoint.LAST}: File too large" in message
    assert not list((run / "checkpoints").glob("*.pt*")), list((run / "checkpoints").iterdir())


def files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_run_directory_is_refused(converted, tmp_path, capsys):
    run = tmp_path / "once"
    assert main(args(converted, run, epochs=1)) == 0
    before = files(run)
    capsys.readouterr()
    assert main(args(converted, run, epochs=1)) == 2
    err = one_line(capsys)
    assert f"{run} already holds a run" in err and f"--resume {run}" in err and "--overwrite" in err
    assert files(run) == before  # byte for byte, nothing added

    assert main(args(converted, run, "--overwrite", epochs=1)) == 0
    aside = list(tmp_path.glob("once.replaced-*"))
    assert len(aside) == 1 and f"moved the old run {run} to {aside[0]}" in " ".join(capsys.readouterr().err.split())
    assert files(aside[0]) == before
    assert (run / "summary.json").exists() and len(records(run, "eval")) == len(records(aside[0], "eval"))


def test_a_run_directory_in_use_is_refused(converted, tmp_path, capsys):
    run = tmp_path / "busy"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live training process holds it
        held.write("4242\n")
        held.flush()
        assert main(args(converted, run, epochs=1)) == 2
    assert "in use by another training process (pid 4242)" in one_line(capsys)
    assert not (run / "config.yaml").exists()


@pytest.mark.parametrize("extra,message", [
    (["--loader", "dali", "--set", "data.options={prefetch_depth: 3}"],
     "unknown option 'prefetch_depth' for the 'dali' loader; known: reader, prefetch_queue_depth"),
    (["--set", "data.options={shuffle_buffer: 3}"], "unknown option 'shuffle_buffer' for the 'torchvision' loader"),
    (["--set", "model.kwargs={depthh: 3}"], "unexpected keyword argument 'depthh'"),
    (["--model", "vit_nope"], "timm has no model 'vit_nope'"),
    (["--set", "data.train_split=training"], "no split 'training'"),
    (["--init", "NOWHERE"], "--init NOWHERE: no checkpoint at NOWHERE"),
    (["--init", "GARBAGE"], "not a checkpoint torch can load"),
    (["--set", "data.ramp={start_size: 48, end_epoch: 2}"], "the end size 32 is below the start size 48"),
    (["--set", "data.ramp={start_size: 26, end_epoch: 2}"],
     "data.ramp.start_size 26 is not a multiple of the model's patch size 4"),
    (["--set", "data.ramp={start_size: 16, end_size: 48, end_epoch: 2}"], "must equal data.image_size 32"),
    (["--objective", "simclr", "--set", "augment.mixup=0.8"], "augment.mixup with train.objective=simclr"),
    (["--set", "augment.rand_augment=rand-m9-inc0"], "only timm's increasing operation set"),
    (["--set", "train.best_on=ema"], "train.best_on=ema needs train.ema_decay"),
    (["--set", "model.compile_eval=true"], "model.compile_eval compiles the supervised evaluation: it needs "
                                          "model.compile=true"),
])
def test_config_mistakes_stop_before_any_work(converted, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "GARBAGE").write_text("not a checkpoint\n")
    if extra[0] == "--loader":
        pytest.importorskip("nvidia.dali")
    run = tmp_path / "runs" / "mistake"
    assert main(args(converted, run, *extra, epochs=1)) == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "runs").exists()  # no run directory, nothing written


def test_bad_resume_targets_stop_before_any_work(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    for target, message in ((tmp_path / "nowhere", "no such run directory or checkpoint file"),
                            (tmp_path / "empty", "not a run directory"),
                            (tmp_path / "notes.pt", f"{tmp_path / 'notes.pt'} cannot be read")):
        assert main(["--resume", str(target)]) == 2
        assert message in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.pt"]
    assert not list((tmp_path / "empty").iterdir())


def test_training_leaves_the_signal_handlers_as_it_found_them(converted, tmp_path):
    """A pool forked after training (make_sample_imagenet's) must die on its SIGTERM: a worker that had
    inherited the trainer's handler set a flag instead, and the pool's join waited for it forever."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(args(converted, tmp_path / "signals", epochs=1)) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
