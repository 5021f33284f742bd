"""The benchmarks run through their real code paths on the CPU, in seconds, and write honest records."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import loaders, report, train_step

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
                            "--device", "cpu", "--results", str(tmp_path), "--profile", str(tmp_path / "prof")]) == 0
    trace = json.loads((tmp_path / "prof" / "trace-torchvision-batch8.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"input: next batch", "train step"} <= names  # the stall can be put down to one or the other
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


RESULTS = ROOT / "benchmarks" / "results"


def test_report_renders_the_recorded_results(tmp_path):
    """From the committed records (H100 and this CPU): a section per machine, tables, and real PNG charts."""
    out = tmp_path / "report.md"
    assert report.main(["--results", str(RESULTS), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## NVIDIA H100 80GB HBM3, 16 cores" in text and "no GPU" in text
    assert "| dali | 8 | full size | cuda | 10,360 |" in text  # the recorded median, unchanged
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def fake_record(directory: Path, name: str, medians: dict, date: str) -> None:
    rows = [{"label": label, "kind": label, "workers": 2, "options": {},
             "images_per_s": {"median": value, "min": value, "max": value, "stdev": 0, "repeats": [value]}}
            for label, value in medians.items()]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({
        "benchmark": "loaders", "date": date, "cpu": "Test CPU", "cores": 2, "gpu": None, "commit": "abc",
        "settings": {"device": "cpu", "max_resolution": 512}, "results": rows}))


def test_compare_gives_b_over_a_for_the_figures_both_sets_have(tmp_path, capsys):
    fake_record(tmp_path / "a", "loaders-1", {"dali": 100.0, "ffcv": 200.0, "torchvision": 50.0}, "20260101T000000Z")
    fake_record(tmp_path / "b", "loaders-2", {"dali": 250.0, "ffcv": 100.0}, "20260102T000000Z")
    rows = report.compare(report.load([tmp_path / "a"]), report.load([tmp_path / "b"]))
    assert {name.split(",")[0]: ratio for _, name, _, _, ratio in rows} == {"loader dali": 2.5, "loader ffcv": 0.5}
    assert report.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| 2.50 |" in capsys.readouterr().out
