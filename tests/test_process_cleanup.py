"""Nothing outlives its run: after the trainer or the converter ends, however it ends, no process it started is
left: no DataLoader or pool worker, no forkserver, no resource tracker (pipelines/processes.py, tie_to_parent).

Each run starts in a session of its own, so everything it starts, at any depth, carries that session's id; the
test ends the run (a SIGKILL of its main process alone, as the OOM killer sends it; a normal exit; a NaN; an
uncaught exception; Ctrl-C sent to the process group, as a terminal sends it) and then polls /proc until no
process of that session is left. Zombies are dead processes waiting for their new parent to reap them: they do
not count. Whatever is still there at the deadline is listed with its command line, then killed.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the death signal is Linux's")

LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv"}
WORKERS = 2
BATCH = 32  # 5 steps per epoch of the conftest sample (168 train images)
GONE_WITHIN_S = 10  # the kernel's death signal is immediate; this is slack for a loaded machine
START_TIMEOUT_S = 300  # to the first evaluation: FFCV compiles its pipeline with numba first


def session(sid: int) -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every live process of session `sid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while being read
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        state, ppid, process_sid = fields[0], int(fields[1]), int(fields[3])
        if process_sid == sid and state != "Z":
            found.append((int(name), ppid, cmdline.strip()))
    return found


def server_children(main: int) -> list[tuple[int, int, str]]:
    """The processes forked by the forkserver that process `main` (a session leader) started: its workers."""
    processes = session(main)
    servers = {pid for pid, ppid, cmd in processes if ppid == main and "multiprocessing.forkserver" in cmd}
    return [p for p in processes if p[1] in servers]


def assert_nothing_left(sid: int, what: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _, _ in left:  # a failed test must not leave them running either
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"{what}: {len(left)} process(es) still running {GONE_WITHIN_S} s later:\n" + "\n".join(
        f"  pid {pid} (parent {ppid}): {cmd[:300]}" for pid, ppid, cmd in left)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def records(run: Path, kind: str) -> list[dict]:
    path, found = run / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if record.get("kind") == kind:
            found.append(record)
    return found


def wait_for(process: subprocess.Popen, log: Path, done, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not done():
        assert process.poll() is None, f"ended (exit {process.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never reached {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def run_args(converted, run: Path, loader: str, epochs: int) -> list[str]:
    return ["--preset", "tiny_cpu", "--data", str(converted[0]), "--loader", loader, "--epochs", str(epochs),
            "--batch-size", str(BATCH), "--workers", str(WORKERS), "--out", str(run.parent), "--name", run.name,
            "--set", "train.log_every=1", "--set", "data.eval_splits=[holdout]"]


def trainer(converted, run: Path, loader: str = "torchvision", epochs: int = 50, poison: str = "") -> subprocess.Popen:
    """training/run.py in a session of its own. `poison`: 'nan' or 'error' makes the training loss of the first
    step of epoch 1 (after epoch 0's evaluation has started the eval loader's workers) a NaN, or raise."""
    if not poison:
        return start([sys.executable, str(ROOT / "training/run.py"), *run_args(converted, run, loader, epochs)],
                     run.parent / f"{run.name}.log")
    at_step = converted[1]["splits"]["train"]["samples"] // BATCH + 1
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        import training.loop as loop
        import training.run as run
        real, steps = loop.F.cross_entropy, [0]

        def poisoned(*args, **kwargs):
            loss = real(*args, **kwargs)
            if torch.is_grad_enabled():  # a training step's loss, not an evaluation's
                steps[0] += 1
                if steps[0] == {at_step}:
                    if {poison!r} == "nan":
                        return loss * float("nan")
                    raise RuntimeError("an unexpected error in a training step")
            return loss
        loop.F.cross_entropy = poisoned
        raise SystemExit(run.main(sys.argv[1:]))
    """)
    return start([sys.executable, "-c", code, *run_args(converted, run, loader, epochs)],
                 run.parent / f"{run.name}.log")


@pytest.mark.parametrize("loader", ["torchvision", "synthetic", "dali", "ffcv"])
def test_a_killed_trainer_leaves_nothing(converted, tmp_path, loader):
    """kill -9 of the trainer's main process alone, in epoch 1: the train and eval loaders have started (with
    torchvision, 4 persistent workers from a forkserver, and its resource tracker)."""
    if loader in LIBRARY:
        pytest.importorskip(LIBRARY[loader])
    run = tmp_path / loader
    process = trainer(converted, run, loader)
    try:
        wait_for(process, run.parent / f"{run.name}.log", lambda: records(run, "eval"), "its first evaluation")
        if loader == "torchvision":  # the workers, forked by a forkserver (the eval loader's too, persistent)
            assert len(server_children(process.pid)) >= WORKERS, session(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:  # the test failed before its kill: nothing of it must stay
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert_nothing_left(process.pid, f"kill -9 of a {loader} trainer")


@pytest.mark.parametrize("ending,exit_code", [("exit", 0), ("nan", 1), ("error", 1), ("ctrl_c", 0)])
def test_a_trainer_that_ends_leaves_nothing(converted, tmp_path, ending, exit_code):
    """The torchvision loader with workers, both loaders started, then: the run ends after its last epoch; a NaN
    loss stops it (exit 1); an exception it does not expect escapes (exit 1, a traceback); Ctrl-C reaches the
    whole process group (the run saves and exits 0)."""
    run = tmp_path / ending
    process = trainer(converted, run, epochs=1 if ending == "exit" else 50,
                      poison=ending if ending in ("nan", "error") else "")
    log = run.parent / f"{run.name}.log"
    try:
        if ending == "ctrl_c":
            wait_for(process, log, lambda: records(run, "eval"), "its first evaluation")
            os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=START_TIMEOUT_S) == exit_code, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if ending != "exit":
        assert records(run, "eval"), "it ended before its eval loader started: " + log.read_text()[-3000:]
    if ending == "error":
        assert "an unexpected error in a training step" in log.read_text()
    assert_nothing_left(process.pid, f"a trainer that ended by {ending}")


def test_a_killed_converter_leaves_nothing(clean_tree, tmp_path):
    """kill -9 of tools/convert_imagenet.py alone while a pool worker is inside a task: its last input, a val
    image, is a FIFO that this test opens for writing and never writes to, so the worker that reads it waits
    there, as on a hung network file. (A pool worker between tasks ends by itself when the converter's end of
    its queues closes; one inside a task ran on, and kept the forkserver and the resource tracker alive.)"""
    tree, out = tmp_path / "tree", tmp_path / "out"
    shutil.copytree(clean_tree[0], tree)
    wnid = sorted(p.name for p in (tree / "val").iterdir())[-1]
    fifo = sorted((tree / "val" / wnid).iterdir())[-1]
    fifo.unlink()
    os.mkfifo(fifo)
    log = tmp_path / "convert.log"
    process = start([sys.executable, str(ROOT / "tools/convert_imagenet.py"), str(tree), str(out), "--workers",
                     str(WORKERS), "--shard-size", "8"], log)
    writer = None

    def worker_reads_the_fifo() -> bool:
        nonlocal writer
        try:  # succeeds once a reader has the FIFO open (Linux counts one blocked in open())
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            return False
        return True
    try:
        wait_for(process, log, worker_reads_the_fifo, "a pool worker reading the FIFO")
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        assert_nothing_left(process.pid, "kill -9 of the converter")
    finally:
        if process.poll() is None:  # the test failed before its kill: nothing of it must stay
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if writer is not None:
            os.close(writer)
