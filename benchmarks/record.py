"""What every benchmark record carries besides its figures: hardware, versions, commit, settings."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "torchvision", "timm", "nvidia-dali-cuda130", "ffcv", "numpy", "pillow", "numba")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        # "-dirty": code differs from the commit. Result files, which benchmarks write, and docs don't count.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results", ":!*.md"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), "platform": platform.platform(),
            "versions": versions, "commit": git_commit()}


def summarize(values: list[float]) -> dict:
    """Median and spread of repeats (the median resists the noise of a shared machine)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "repeats": values}


def write_record(name: str, record: dict, directory: Path | None = None) -> Path:
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "date": stamp, **environment(), **record}, indent=1) + "\n")
    return path
