"""Training throughput: images/s of the trainer's own step fed by the synthetic loader and by each real
loader, side by side in one run. real / synthetic is the number the project lives by.

    python -m benchmarks.train_step --data OUT [--preset vit_b16_seed] [--kinds synthetic dali ffcv torchvision]
                                    [--batch-size 64 256] [--steps 30] [--repeats 5] [--warmup 15] [--profile DIR]

One model per batch size, compiled once (every loader yields the same shape and dtype, so no recompile),
and trained in turn from each loader: `--warmup` steps outside the clock (the compile lands there), then
`--repeats` windows of `--steps` steps, the device synchronized at each window's edges; the figure is the
median window. MFU counts the training FLOPs of one image (torch's FlopCounterMode over a forward and backward;
~105 GFLOP for ViT-B/16 at 224 px) against `--peak-tflops` (default: 989, the H100 SXM's dense bf16 peak, when
the GPU is an H100 or H200; none on other devices). Writes benchmarks/results/train_step-<stamp>.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import goals, record
from benchmarks.loaders import batch_images, endless, sync
from benchmarks.record import summarize, write_record
from pipelines import KINDS, build_loader
from pipelines.contract import LoaderUnavailable
from pipelines.formats.manifest import load_manifest
from training.config import apply_overrides, load_config
from training.loop import Step, train_step
from training.objectives import build_network, build_objective
from training.optim import build_optimizer, build_scheduler
from training.run import DTYPES, autocast_factory

GOALS = {"synthetic_images_per_s_h100": goals.SYNTHETIC,
         **{f"{kind}_vs_synthetic": target for kind, target in goals.VS_SYNTHETIC.items()}}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 with fp32 accumulate, SXM


def train_flops_per_image(model: torch.nn.Module, image_size: int, device: torch.device, autocast) -> float:
    """FLOPs of one image's forward and backward, as torch counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    images = torch.randn(2, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter, autocast():
        model(images).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def default_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def measure(step: Step, loader, device: torch.device, args) -> dict:
    batches = endless(loader)
    for _ in range(args.warmup):
        train_step(step, *next(batches))
    rates, waits = [], []
    for _ in range(args.repeats):
        sync(device)
        start, waited, images = time.perf_counter(), 0.0, 0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t0
            train_step(step, *batch)
            images += batch_images(batch)  # views count: each is a model input
        sync(device)
        elapsed = time.perf_counter() - start
        rates.append(images / elapsed)
        waits.append(waited / elapsed)
    batches.close()
    return {"images_per_s": summarize(rates), "input_wait": summarize(waits)}


def profile(step: Step, loader, device: torch.device, directory: Path, name: str, steps: int = 5) -> dict:
    """A torch profiler trace (Chrome format, open in chrome://tracing or Perfetto) of a few training steps,
    with the wait for each batch marked, so that a stall can be put down to the input or to the model.
    Here, unlike the timed windows, the device is synchronized after every step, so that the two ranges are
    wall times: `input_ms` is what the step waited for its batch, `step_ms` what the model took. A loader that
    competes for the GPU or the cores shows as a `step_ms` above synthetic input's."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = endless(loader)
    train_step(step, *next(batches))  # out of the trace: the first batch of an epoch waits for the pipeline
    sync(device)
    waits, steps_ms = [], []
    with torch_profile(activities=activities) as trace:
        for _ in range(steps):
            t0 = time.perf_counter()
            with record_function("input: next batch"):
                batch = next(batches)
            t1 = time.perf_counter()
            with record_function("train step"):
                train_step(step, *batch)
                sync(device)
            waits.append((t1 - t0) * 1e3)
            steps_ms.append((time.perf_counter() - t1) * 1e3)
    batches.close()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"trace-{name}.json"
    trace.export_chrome_trace(str(path))
    return {"trace": str(path), "input_ms": statistics.median(waits), "step_ms": statistics.median(steps_ms)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--preset", default="vit_b16_seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--objective", choices=["supervised", "simclr", "rotation"], default=None,
                   help="what the step minimizes (default: the preset's); simclr reads two views per image")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="default: the preset's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: all cores)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=15, help="steps before the clock (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: 989 on H100/H200)")
    p.add_argument("--results", type=Path, default=record.RESULTS)
    p.add_argument("--profile", type=Path, metavar="DIR", help="also write a profiler trace per loader into DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console, device = Console(), torch.device(args.device)
    overrides = args.set + (["model.compile=false"] if args.no_compile else []) + \
        ([f"train.objective={args.objective}"] if args.objective else [])
    config = apply_overrides(load_config(args.preset), overrides)
    objective = build_objective(config)
    num_classes = load_manifest(args.data)["num_classes"]
    autocast = autocast_factory(config.train.precision, device)
    peak = args.peak_tflops or default_peak(device)
    rows, failed = [], []
    for batch_size in args.batch_size or [config.data.batch_size]:
        torch.manual_seed(0)
        model = build_network(config, objective, num_classes).to(device)
        model = model.to(memory_format=torch.channels_last)
        flops = train_flops_per_image(model, config.data.image_size, device, autocast)
        optimizer = build_optimizer(model, config.optim)
        scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch=1000, epochs=1)
        scaler = torch.amp.GradScaler(device.type) if config.train.precision == "fp16" else None
        trained = torch.compile(model) if config.model.compile else model
        step = Step(trained, optimizer, scheduler, scaler, autocast, config.optim.label_smoothing,
                    config.optim.grad_clip, objective)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for kind in args.kinds:
            console.print(f"[dim]batch {batch_size}: training from {kind} ...[/dim]")
            try:
                loader = build_loader(kind, args.data, config.data.train_split, batch_size=batch_size,
                                      image_size=config.data.image_size, train=True, device=device,
                                      dtype=DTYPES[config.train.precision], workers=args.workers,
                                      views=objective.views,
                                      options=config.data.options if kind == config.data.loader else None)
            except LoaderUnavailable as e:
                console.print(f"[yellow]skipped {kind}: {e}[/yellow]")
                continue
            try:
                result = measure(step, loader, device, args)
                if args.profile:
                    result["profile"] = profile(step, loader, device, args.profile, f"{kind}-batch{batch_size}")
                    console.print(f"[dim]profile: {result['profile']}[/dim]")
            except Exception as e:  # one broken loader must not cost the others' figures (a short GPU window)
                console.print(f"[red]{kind}, batch {batch_size} failed: {type(e).__name__}: {e}[/red]")
                failed.append({"kind": kind, "batch_size": batch_size, "error": f"{type(e).__name__}: {e}"})
                continue
            rate = result["images_per_s"]["median"]
            rows.append({"kind": kind, "batch_size": batch_size, **result, "train_flops_per_image": flops,
                         "mfu": rate * flops / (peak * 1e12) if peak else None})
            del loader
        if device.type == "cuda":
            for r in rows:
                if r["batch_size"] == batch_size:
                    r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for r in rows:
        synthetic = next((s for s in rows if s["kind"] == "synthetic" and s["batch_size"] == r["batch_size"]), None)
        if synthetic:
            r["vs_synthetic"] = r["images_per_s"]["median"] / synthetic["images_per_s"]["median"]

    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "config": config.to_dict(), "peak_tflops": peak, "device": str(device), "objective": objective.name}
    path = write_record("train_step", {"settings": settings, "goals": GOALS, "results": rows, "failed": failed},
                        args.results)
    env = record.environment()
    lines = [f"Training images/s ({config.model.name}, {objective.name}, {config.data.image_size} px, "
             f"{config.train.precision}, "
             f"compile {config.model.compile}), median of {args.repeats} windows of {args.steps} steps.",
             f"Hardware: {env['cpu']} ({env['cores']} cores){', ' + env['gpu'] if env['gpu'] else ''}. "
             f"Commit {env['commit']}. MFU against {peak or '-'} TFLOP/s.", "",
             "| loader | batch | images/s | vs synthetic | input wait | MFU |", "|---|---:|---:|---:|---:|---:|"]
    table = Table(title=f"training images/s ({config.model.name}, {device.type})")
    for column in ("loader", "batch", "images/s", "vs synthetic", "input wait", "MFU"):
        table.add_column(column, justify="right")
    for r in rows:
        cells = [r["kind"], str(r["batch_size"]), f"{r['images_per_s']['median']:,.1f}",
                 f"{r['vs_synthetic']:.3f}" if "vs_synthetic" in r else "-", f"{r['input_wait']['median']:.1%}",
                 f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    console.print(table)
    console.print(f"record: {path} (and .md)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
