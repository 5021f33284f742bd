"""DDP over gloo with real processes: each rank draws its own augmentation and a resume repeats every rank's
draws; a NaN on one rank stops all of them at the same window; two single-process "nodes" train as one
two-process launch. The tiny_cpu preset at 32 px on the quirky sample (168 train images: 84 per rank, 5 steps of
16 per epoch)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROBE = str(ROOT / "tests" / "ddp_probe.py")
# DeiT's batch augmentation and drop path: every draw a step makes on the batch or in the model
DRAWS = ["--set", "augment.mixup=0.8", "--set", "augment.cutmix=1.0", "--set", "augment.erasing=0.25",
         "--set", "model.drop_path_rate=0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(converted, run_dir, *extra, loader="synthetic", epochs=2):
    return ["--preset", "tiny_cpu", "--data", str(converted[0]), "--loader", loader, "--epochs", str(epochs),
            "--batch-size", "16", "--workers", "1", "--out", str(run_dir.parent), "--name", run_dir.name, *extra]


def environment(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(script_args, *, env, nproc=2, launcher=()):
    launch = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--nproc-per-node", str(nproc),
                                                                           "--master-port", str(free_port())])]
    done = subprocess.run([*launch, PROBE, *script_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def draws(directory: Path) -> dict:
    """(rank, step) -> what the step drew; a resumed run's later lines replace nothing (each step runs once)."""
    found = {}
    for path in sorted(directory.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            key = (record.pop("rank"), record.pop("step"))
            assert key not in found, f"step {key} drawn twice"
            found[key] = record
    return found


def test_each_rank_draws_its_own_augmentation_and_a_resume_repeats_them(converted, tmp_path):
    """The synthetic loader hands both ranks the same batch, so whatever differs between their augmented inputs
    was drawn differently. Straight: 2 epochs (10 steps). Interrupted: stopped after step 3, then --resume: every
    rank's draws at every step are the straight run's, and so are the final weights."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    (tmp_path / "straight-draws").mkdir(), (tmp_path / "interrupted-draws").mkdir()
    torchrun(args(converted, straight, "--set", "train.log_every=1", *DRAWS),
             env=environment(PROBE_DRAWS=str(tmp_path / "straight-draws")))
    resumed_env = environment(PROBE_DRAWS=str(tmp_path / "interrupted-draws"))
    torchrun(args(converted, interrupted, "--set", "train.log_every=1", "--set", "train.stop_at_step=3", *DRAWS),
             env=resumed_env)
    assert checkpoint.load(interrupted / "checkpoints" / "last.pt")["position"]["step"] == 3
    torchrun(["--resume", str(interrupted)], env=resumed_env)

    a, b = draws(tmp_path / "straight-draws"), draws(tmp_path / "interrupted-draws")
    assert sorted(a) == sorted(b) == [(rank, step) for rank in (0, 1) for step in range(10)]
    for step in range(10):
        first, second = a[0, step], a[1, step]
        assert first["inputs"] != second["inputs"] and first["generator"] != second["generator"], (step, first, second)
    for key in a:
        assert a[key]["generator"] == b[key]["generator"], key
        assert a[key]["inputs"] == pytest.approx(b[key]["inputs"], rel=1e-6), key
        assert a[key]["targets"] == pytest.approx(b[key]["targets"], rel=1e-9), key
    wa = checkpoint.load(straight / "checkpoints" / "last.pt")["model"]
    wb = checkpoint.load(interrupted / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_window(converted, tmp_path):
    """Two ranks started as a cluster scheduler starts them (no torchrun agent to tear the job down): rank 1's
    loss is NaN at step 6 (epoch 1). Both ranks stop at the window that holds it (steps 6-7), say so, exit 1 within
    seconds of each other, and leave epoch 0's checkpoint as last.pt."""
    run = tmp_path / "nan"
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PROBE_NAN="1:6")
        processes.append(subprocess.Popen([sys.executable, PROBE, *args(converted, run, "--set", "train.log_every=2")],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    ended, outputs = {}, {}
    deadline = time.monotonic() + 300
    while len(ended) < 2 and time.monotonic() < deadline:
        for rank, process in enumerate(processes):
            if rank not in ended and process.poll() is not None:
                ended[rank] = time.monotonic()
        time.sleep(0.1)
    for rank, process in enumerate(processes):
        if process.poll() is None:
            process.kill()
        outputs[rank] = " ".join(process.communicate()[0].split())
    assert len(ended) == 2, f"a rank was still running after 300 s: {outputs}"
    assert abs(ended[0] - ended[1]) < 15, ended
    for rank, process in enumerate(processes):
        assert process.returncode == 1, (rank, outputs[rank][-3000:])
        assert "stopped: the training loss became nan within steps 6-7 (epoch 1, on 1 of 2 ranks)" in outputs[rank], \
            (rank, outputs[rank][-3000:])
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert saved["position"] == {"epoch": 1, "batch": 0, "step": 5}


def test_two_nodes_train_as_one_two_process_launch(converted, tmp_path):
    """`torchrun --nnodes 2` twice (one process per node, a static rendezvous on 127.0.0.1), as docs/training.md
    shows for several machines, against one `--nproc-per-node 2` launch: one epoch, the same weights (gloo's sums
    in the same order; 5e-5 absorbs a different reduction schedule)."""
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    torchrun(args(converted, single, loader="dali", epochs=1), env=environment())
    port = free_port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), PROBE,
         *args(converted, nodes, loader="dali", epochs=1)],
        cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    for launch in launches:
        output = launch.communicate(timeout=600)[0]
        assert launch.returncode == 0, output[-3000:]
    wa = checkpoint.load(single / "checkpoints" / "last.pt")["model"]
    wb = checkpoint.load(nodes / "checkpoints" / "last.pt")["model"]
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 5e-5, worst
