"""A run directory belongs to one run: a new run never writes into an old one, and two processes never train
into the same one.

- `claim(run_dir, resume=False, overwrite=False)` takes the directory for this process: a lock (flock, so a
  killed process frees it), and, for a new run, a refusal when the directory already holds a run, unless
  --overwrite, which moves the old run aside (to `<name>.replaced-<UTC time>`), deleting nothing.
- `supersede(run_dir, step)` on a resume: the metrics logged after the checkpoint's step describe training that
  is done again, so they move to metrics.superseded.jsonl, and metrics.jsonl reads as one uninterrupted run.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from pipelines.formats.files import atomic_write_bytes

from .config import ConfigError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
LOCK = ".lock"


class RunDirError(ConfigError):
    """A run directory this run may not use; the message says what to do instead."""


def holds_run(run_dir: Path) -> list[str]:
    """The files of a run found in `run_dir` (none for a missing or empty directory)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _lock(run_dir: Path):
    """An exclusive flock on run_dir/.lock, held until the process ends (a kill -9 included)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(f"{run_dir} is in use by another training process (pid {owner}); wait for it to end "
                          "or stop it, then run this again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def claim(run_dir: Path, *, resume: bool, overwrite: bool, say):
    """Locks `run_dir` for this process and returns the lock's handle (keep it open). Raises RunDirError when
    a new run would write into an old one, or another process holds the directory."""
    found = holds_run(run_dir)
    if not found or resume:
        return _lock(run_dir)
    if not overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({', '.join(found)}), and nothing in it was changed. "
                          f"To continue it: --resume {run_dir}. To start it again: --overwrite (the old run is "
                          "moved aside, not deleted). Or choose another --name")
    _lock(run_dir).close()  # nobody is training in it: moving it aside pulls nothing from under a live run
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.rename(run_dir, aside)
    say(f"--overwrite: moved the old run {run_dir} to {aside} (delete it when it is no longer needed)")
    return _lock(run_dir)


def supersede(run_dir: Path, step: int) -> int:
    """Moves the metrics.jsonl lines logged after optimizer step `step` (and a last line cut short by a kill) to
    metrics.superseded.jsonl. Returns how many moved."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    kept, moved = [], []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            moved.append(line)
            continue
        (moved if record.get("step", 0) > step else kept).append(line)
    if moved:
        with open(run_dir / "metrics.superseded.jsonl", "a") as f:
            f.write("".join(f"{line}\n" for line in moved))
        atomic_write_bytes(metrics, "".join(f"{line}\n" for line in kept).encode())
    return len(moved)
