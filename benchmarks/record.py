"""What every benchmark record carries besides its figures: hardware (the GPU's compute capability and bf16 peak
with it), versions, commit (with the uncommitted difference, when there is one), settings."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The measured code, as a git pathspec: all but the records and charts the benchmarks write, and the docs.
CODE = ("--", ".", ":!benchmarks/results", ":!benchmarks/charts", ":!*.md")
DIFF_LIMIT = 4_000_000  # characters of diff a record keeps (a code edit is kilobytes; this is a runaway guard)
# Dense bf16 tensor-core TFLOP/s, the more specific names first ("H100 PCIe" before "H100"): SXM parts 989,
# the H100 PCIe 756, the NVL cards 835.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0))
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


def peak_bf16_tflops(name: str) -> float | None:
    """The dense bf16 (and fp16) tensor-core peak of a GPU by its name, for MFU; None for one not listed.
    NVIDIA's data sheets quote it with 2:4 sparsity, twice these figures. The H200 is the H100's Hopper chip
    (GH100) with 141 GB of HBM3e: the same peak in the same form factor."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def cuda_device() -> dict:
    """The CUDA device torch uses: its name, compute capability ("9.0" for Hopper) and the bf16 peak that MFU is
    taken against. Empty without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": name, "gpu_compute_capability": f"{major}.{minor}", "gpu_peak_bf16_tflops": peak_bf16_tflops(name)}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


def git_state() -> dict:
    """The commit ("-dirty" when the code differs from it) and, when it does, the difference: `git diff HEAD`
    of the tracked files and every untracked file in full, as one patch that `git apply` on that commit turns
    back into the measured code. The result files the benchmarks write, the charts and the docs don't count."""
    try:
        commit = _git("rev-parse", "--short", "HEAD").strip()
        if not commit:
            return {"commit": "unknown", "diff": None}
        diff = _git("diff", "HEAD", *CODE)
        for path in filter(None, _git("ls-files", "--others", "--exclude-standard", "-z", *CODE).split("\0")):
            diff += _git("diff", "--no-index", "--", "/dev/null", path)  # a new file, as `git apply` reads it
    except OSError:
        return {"commit": "unknown", "diff": None}
    if not diff:
        return {"commit": commit, "diff": None}
    state = {"commit": f"{commit}-dirty", "diff": diff[:DIFF_LIMIT]}
    if len(diff) > DIFF_LIMIT:
        state["diff_truncated"] = f"{len(diff):,} characters, the first {DIFF_LIMIT:,} kept: not enough to rebuild"
    return state


def environment() -> dict:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), **cuda_device(),
            "platform": platform.platform(), "versions": versions, **git_state()}


def summarize(values: list[float]) -> dict:
    """Median and spread of repeats (the median resists the noise of a shared machine)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "repeats": values}


def record_path(name: str, directory: Path | None = None) -> Path:
    """Where a new record goes: `<name>-<UTC stamp>.json` in `directory` (default benchmarks/results)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return (directory or RESULTS) / f"{name}-{stamp}.json"


def write_record(name: str, record: dict, directory: Path | None = None, path: Path | None = None) -> Path:
    """Writes a record with the environment; `path` (from record_path) rewrites the same one, so that a benchmark
    can save its figures row by row and keep them when a time limit ends it."""
    path = path or record_path(name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = path.stem.rsplit("-", 1)[-1]
    path.write_text(json.dumps({"benchmark": name, "date": stamp, **environment(), **record}, indent=1) + "\n")
    return path
