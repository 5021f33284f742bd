"""The benchmarks run through their real code paths on the CPU, in seconds, and write honest records."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import loaders, train_step

ROOT = Path(__file__).resolve().parents[1]


def record(directory: Path, name: str) -> dict:
    (path,) = directory.glob(f"{name}-*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


def test_loader_benchmark_records_medians_and_ratios(converted, tmp_path):
    pytest.importorskip("nvidia.dali")
    assert loaders.main(["--data", str(converted[0]), "--kinds", "dali", "torchvision", "synthetic", "--workers", "1",
                         "--batch-size", "8", "--image-size", "32", "--batches", "2", "--repeats", "3",
                         "--warmup", "1", "--device", "cpu", "--results", str(tmp_path)]) == 0
    r = record(tmp_path, "loaders")
    rows = {row["label"]: row for row in r["results"]}
    assert set(rows) == {"dali", "torchvision", "synthetic"}
    for row in rows.values():
        s = row["images_per_s"]
        assert len(s["repeats"]) == 3 and s["min"] <= s["median"] <= s["max"] and s["median"] > 0
    assert rows["dali"]["vs_torchvision"] == pytest.approx(
        rows["dali"]["images_per_s"]["median"] / rows["torchvision"]["images_per_s"]["median"])
    assert "vs_torchvision" not in rows["torchvision"] and "vs_torchvision" not in rows["synthetic"]
    assert r["cores"] and r["versions"]["torch"] and r["commit"] and r["settings"]["batch_size"] == 8


def test_train_step_benchmark_reports_real_over_synthetic(converted, tmp_path):
    assert train_step.main(["--data", str(converted[0]), "--preset", "tiny_cpu", "--kinds", "synthetic", "torchvision",
                            "--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1", "--workers", "1",
                            "--device", "cpu", "--results", str(tmp_path)]) == 0
    r = record(tmp_path, "train_step")
    rows = {row["kind"]: row for row in r["results"]}
    assert rows["synthetic"]["vs_synthetic"] == 1.0
    assert rows["torchvision"]["vs_synthetic"] == pytest.approx(
        rows["torchvision"]["images_per_s"]["median"] / rows["synthetic"]["images_per_s"]["median"])
    # the tiny ViT (4 blocks, 64 tokens of 192 dims) costs tens of MFLOP per image, forward and backward
    assert 1e6 < rows["synthetic"]["train_flops_per_image"] < 1e9
    assert rows["synthetic"]["mfu"] is None  # no stated peak on a CPU: no MFU rather than a made-up one


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the same script with tiny sizes on the CPU (GPU tests skip)."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": str(ROOT / ".venv/bin/python")}
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python3"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(tmp_path / "results")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "all steps passed" in done.stdout and "| torchvision |" in done.stdout
    names = {p.name for p in (tmp_path / "results").iterdir()}
    assert {"environment.txt", "steps.log"} <= names and len(names) <= 8  # what comes back from the GPU machine
    assert any(n.startswith("loaders-") and n.endswith(".json") for n in names)
    assert any(n.startswith("train_step-") and n.endswith(".json") for n in names)
    log = (tmp_path / "results" / "steps.log").read_text()
    assert all(f"== {step}:" in log for step in ("gpu-tests", "sample", "convert", "convert-512", "loaders", "train"))
