"""The trainer end to end, as a user runs it, on real data: a short run stopped half-way and resumed to its end,
through each loader, with what it measured and whether anything went wrong.

    python -m benchmarks.smoke --data OUT [--loaders dali ffcv] [--preset deit_b16] [--batch-size 128]
                               [--stop-at 150] [--work DIR] [--results DIR] [--device cuda|cpu]

For each loader: `training/run.py` in its own process, with the preset's recipe (deit_b16: RandAugment in the
loader, mixup and cutmix, erasing, drop path, an EMA) at `--batch-size`, over 2 epochs with a two-size resolution
ramp (epoch 0 at `--ramp-start` px, epoch 1 at the preset's size) and one evaluation at the end; stopped after
`--stop-at` steps by train.stop_at_step (it saves and exits 0), then `--resume`d in a new process to its end.
Both processes run with TORCH_LOGS=recompiles.

It fails (exit 1, the reason in the record) on: a process that exits non-zero (an exception, or a NaN: the
trainer stops with exit 1), a resumed run that does not end at the uninterrupted run's step count or lacks its
evaluation, a train size the ramp did not plan, and a recompile storm: more graphs than the process's sizes need
(one per size; evaluation runs uncompiled) or torch's recompile limit hit.

What it records, per loader: each process's wall time and recompiles, the median images/s and input wait of the
train log windows at each size (the first window of each size in each process holds its compile and is left
out), the evaluation's figures and seconds. The record (benchmarks/results/smoke-<stamp>.json) is rewritten
after each loader, so a time limit keeps the loaders finished before it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from benchmarks import record
from benchmarks.record import record_path, write_record

ROOT = Path(__file__).resolve().parents[1]
RECOMPILE = re.compile(r"Recompiling function")
LIMIT_HIT = re.compile(r"hit config\.(recompile_limit|cache_size_limit)|cache_size_limit reached|recompile_limit reached")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a converted dataset (tools/convert_imagenet.py's OUT)")
    p.add_argument("--loaders", nargs="+", default=["dali", "ffcv"])
    p.add_argument("--preset", default="deit_b16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ramp-start", type=int, default=160, help="epoch 0's size (epoch 1 trains at the preset's)")
    p.add_argument("--stop-at", type=int, default=150, help="the first process stops after this many steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides, for every run")
    p.add_argument("--device", default=None, help="train.device (default: the preset's)")
    p.add_argument("--timeout-s", type=float, default=600, help="per process")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "smoke", help="where the runs go")
    p.add_argument("--results", type=Path, default=record.RESULTS)
    return p.parse_args(argv)


def run_args(args, loader: str) -> list[str]:
    overrides = [f"data.ramp={{start_size: {args.ramp_start}, start_epoch: 0, end_epoch: 1}}",
                 "train.eval_every=2", f"train.log_every={args.log_every}", f"train.stop_at_step={args.stop_at}",
                 *args.set]
    device = ["--device", args.device] if args.device else []
    return ["--preset", args.preset, "--loader", loader, "--data", str(args.data), "--batch-size",
            str(args.batch_size), "--epochs", "2", "--out", str(args.work), "--name", f"smoke-{loader}", "--overwrite",
            *device, *[item for override in overrides for item in ("--set", override)]]


def launch(command: list[str], log: Path, timeout_s: float) -> dict:
    """One training process; its output goes to `log`. Returns its exit status, wall time and recompiles."""
    env = {**os.environ, "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with log.open("w") as out:
        try:
            code = subprocess.run([sys.executable, str(ROOT / "training" / "run.py"), *command], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    text = log.read_text(errors="replace")
    return {"exit": code, "wall_s": round(time.monotonic() - start, 1), "recompiles": len(RECOMPILE.findall(text)),
            "limit_hit": bool(LIMIT_HIT.search(text)), "log": str(log), "tail": text[-2000:]}


def windows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if r.get("kind") in ("train", "eval", "resume")]


def rates(records: list[dict]) -> dict:
    """Median images/s and input wait per size, without the first window of each size in each process (its
    compile). A "resume" line marks where the second process starts."""
    by_size, seen = {}, set()
    process = 0
    for r in records:
        if r["kind"] == "resume":
            process += 1
            continue
        if r["kind"] != "train":
            continue
        key = (process, r["image_size"])
        if key not in seen:
            seen.add(key)
            continue
        by_size.setdefault(r["image_size"], []).append(r)
    return {str(size): {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                        "input_wait": statistics.median(r["input_wait"] for r in rs), "windows": len(rs)}
            for size, rs in sorted(by_size.items())}


def check(loader: str, runs: list[dict], records: list[dict], summary: dict | None, sizes: set[int]) -> list[str]:
    """What went wrong with one loader's two processes, as sentences (empty: nothing)."""
    problems = []
    for phase, run in zip(("first", "resume"), runs):
        if run["exit"] != 0:
            problems.append(f"{phase} process exited with {run['exit']} (log {run['log']})")
        planned = run["sizes"]
        if run["recompiles"] > max(0, planned - 1) or run["limit_hit"]:
            problems.append(f"{phase} process: a recompile storm ({run['recompiles']} recompiles for {planned} "
                            f"size(s){', the recompile limit hit' if run['limit_hit'] else ''})")
    trained = {r["image_size"] for r in records if r["kind"] == "train"}
    if trained - sizes:
        problems.append(f"trained at sizes {sorted(trained)}, the ramp plans {sorted(sizes)}")
    per_epoch = max((r["batch"] for r in records if r["kind"] == "train" and r["epoch"] == 0), default=0)
    if summary is None:
        problems.append("no summary.json: the resumed run did not finish")
    elif summary["steps"] != 2 * per_epoch:
        problems.append(f"the resumed run ended at step {summary['steps']}, an uninterrupted one at {2 * per_epoch}")
    elif not summary.get("final"):
        problems.append("the run ended without its evaluation")
    return problems


def smoke(args, loader: str, console: Console) -> dict:
    run_dir = args.work / f"smoke-{loader}"
    args.work.mkdir(parents=True, exist_ok=True)
    first_args = run_args(args, loader)
    console.print(f"[dim]{loader}: python training/run.py {' '.join(first_args)}[/dim]")
    first = launch(first_args, args.work / f"smoke-{loader}-first.log", args.timeout_s)
    resumed = {"exit": None, "skipped": "the first process failed"}
    if first["exit"] == 0:
        resume_args = ["--resume", str(run_dir), "--set", "train.stop_at_step=0"]
        resumed = launch(resume_args, args.work / f"smoke-{loader}-resume.log", args.timeout_s)
    records = windows(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    sizes = {args.ramp_start, *(r["image_size"] for r in records if r["kind"] == "train" and r["epoch"] == 1)}
    # the sizes each process trained at: what its graphs should number
    cut = next((i for i, r in enumerate(records) if r["kind"] == "resume"), len(records))
    first["sizes"] = len({r["image_size"] for r in records[:cut] if r["kind"] == "train"}) or 1
    resumed.setdefault("sizes", len({r["image_size"] for r in records[cut:] if r["kind"] == "train"}) or 1)
    resumed.setdefault("recompiles", 0)
    resumed.setdefault("limit_hit", False)
    problems = check(loader, [first, resumed], records, summary, sizes)
    evaluations = [r for r in records if r["kind"] == "eval"]
    return {"loader": loader, "ok": not problems, "problems": problems,
            "runs": {"first": first, "resume": resumed}, "by_size": rates(records),
            "steps": summary["steps"] if summary else None, "evaluation": evaluations,
            "summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    path = record_path("smoke", args.results)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = []
    for loader in args.loaders:
        try:
            from pipelines import check_options
            check_options(loader, None)
        except ImportError as e:  # the loader's library is missing here: skipped with the reason
            results.append({"loader": loader, "ok": None, "skipped": str(e)})
            console.print(f"[yellow]{loader}: skipped ({e})[/yellow]")
            continue
        result = smoke(args, loader, console)
        results.append(result)
        write_record("smoke", {"settings": settings, "results": results}, path=path)
        line = ", ".join(f"{size} px {v['images_per_s']:,.0f} img/s (input wait {v['input_wait']:.0%})"
                         for size, v in result["by_size"].items())
        console.print(f"{loader}: {'ok' if result['ok'] else 'FAILED'}; steps {result['steps']}; {line}")
        for problem in result["problems"]:
            console.print(f"[red]  {problem}[/red]")
            for phase in ("first", "resume"):
                tail = result["runs"][phase].get("tail")
                if tail and result["runs"][phase].get("exit") != 0:
                    console.print(tail[-1500:], markup=False)
    write_record("smoke", {"settings": settings, "results": results}, path=path)
    console.print(f"record: {path}")
    return 0 if all(r["ok"] is not False for r in results) and any(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
