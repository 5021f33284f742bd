"""Worker processes start safely in a process where DALI's, FFCV's (numba's TBB pool) and torch's threads run
(pipelines/processes.py): build the four loaders in one process, in the benchmark's order, then start
torchvision's DataLoader workers three times and the converter's pool once. Forking such a process copies
held locks into the child: numba's TBB layer warns "Unable to join threads to shut down before fork()", and
such a run has aborted (SIGABRT) and hung. So the run must exit 0, within the timeout, with no fork warning.

With the workers forked instead (multiprocessing's default on Linux), the same script prints numba's warning
(on stdout) at each DataLoader start after FFCV has run: 8 times, and the test fails.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # 4.4 min measured on 2 cores under load ~9: FFCV's compile, 4 DataLoaders, a conversion
FORK_WARNINGS = re.compile(r"Unable to join threads|fork\(\) may lead to deadlocks|fork\(\)|os\.fork")

SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    from pathlib import Path
    import torch
    from rich.console import Console
    from pipelines import build_loader
    from pipelines.convert.job import ConvertSettings, convert

    data, tree, out = (Path(arg) for arg in sys.argv[1:4])

    def take(loader, batches=2):
        iterator = iter(loader)
        for _ in range(batches):
            images, labels = next(iterator)
            assert images.shape[0] == labels.shape[0] == 8
        return iterator

    def build(kind, workers=2):
        return build_loader(kind, data, "train", batch_size=8, image_size=32, train=True, device="cpu",
                            workers=workers)

    kept = []  # the loaders and their iterators stay alive, their threads too
    for kind, library in (("dali", "nvidia.dali"), ("ffcv", "ffcv"), ("torchvision", None), ("synthetic", None)):
        if library and importlib.util.find_spec(library) is None:
            continue
        loader = build(kind)
        kept.append((loader, take(loader)))  # mid-epoch: FFCV's decode thread and numba's TBB pool stay up
        print("read", kind, flush=True)
    for attempt in range(3):
        loader = build("torchvision")
        loader.set_epoch(attempt)
        take(loader, 4)
        del loader
    print("torchvision x3", flush=True)
    convert(tree, out, ConvertSettings(formats=("dali",), shard_size=20), workers=2,
            console=Console(stderr=True, quiet=True))
    print("converted", flush=True)
""")


def test_workers_start_safely_beside_dali_ffcv_and_torch_threads(converted, clean_tree, tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        run = subprocess.run([sys.executable, "-c", SCRIPT, str(converted[0]), str(clean_tree[0]),
                              str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung: not done after {TIMEOUT_S} s; its output so far:\n{e.stdout}\n{e.stderr}")
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert "torchvision x3" in run.stdout and "converted" in run.stdout, run.stdout
    assert not FORK_WARNINGS.search(run.stdout + run.stderr), run.stdout + run.stderr  # numba's goes to stdout
