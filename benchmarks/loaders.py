"""Loader throughput: images/s of each loader alone, on the same stored images, over a sweep of workers.

    python -m benchmarks.loaders --data OUT [--kinds dali ffcv torchvision synthetic] [--workers 1 2]
                                 [--device cuda] [--batch-size 64] [--image-size 224] [--batches 20]

Each (loader, workers) pair builds its train loader once and reads batches continuously, across epochs
(set_epoch each time) as a trainer would. The first `--warmup` batches are outside the clock: they hold
FFCV's numba compile (~20 s on 2 cores), DALI's decoder set-up and the worker start. Then `--repeats`
windows of `--batches` batches are timed, the device synchronized at each window's edges; the figure is
the median window. Ratios are taken against the torchvision baseline at the same worker count, from the same
run. Writes benchmarks/results/loaders-<stamp>.json and .md (or into --results).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import goals as goals_
from benchmarks import record
from benchmarks.record import summarize, write_record
from pipelines import KINDS, build_loader
from pipelines.contract import LoaderUnavailable
from pipelines.formats.manifest import load_manifest



def endless(loader):
    """Batches across epochs, reshuffled each epoch, as the trainer reads them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def batch_images(batch) -> int:
    """Images in one batch: (images, labels), or (views, labels) from a two-view loader (each view counts)."""
    images = batch[0]
    return sum(v.shape[0] for v in images) if isinstance(images, (tuple, list)) else images.shape[0]


def decode_ceiling(data: Path, split: str, images: int = 200) -> dict:
    """What one core decodes per second with PIL (libjpeg-turbo, as every loader here uses on the CPU) from
    the same stored JPEGs, full decode to RGB, no augmentation. Times the cores, it bounds what any CPU
    loader can reach, so a loader near it is decode-bound and no pipeline change makes it much faster."""
    import io

    from PIL import Image

    from pipelines.formats.manifest import dali_shards
    from pipelines.formats.webdataset import ShardReader
    reader = ShardReader(dali_shards(data, load_manifest(data), split))
    blobs = [reader.read(i)[0] for i in range(min(images, len(reader)))]
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for blob in blobs:
            Image.open(io.BytesIO(blob)).convert("RGB")
        rates.append(len(blobs) / (time.perf_counter() - t0))
    return {"images_per_s_per_core": summarize(rates), "images": len(blobs)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(kind: str, data: Path, *, workers: int, device: torch.device, args, options: dict | None) -> dict:
    start = time.perf_counter()
    loader = build_loader(kind, data, args.split, batch_size=args.batch_size, image_size=args.image_size,
                          train=True, device=device, dtype=args.dtype, workers=workers, options=options,
                          views=args.views)
    batches = endless(loader)
    for _ in range(args.warmup):
        next(batches)
    sync(device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        images = count = 0
        # at least --batches batches and at least --window-s seconds: a fast loader gets a window long enough
        # to measure, and a slow one (1 worker) does not hold the suite for minutes
        while count < args.batches or time.perf_counter() - t0 < args.window_s:
            images += batch_images(next(batches))
            count += 1
        sync(device)
        rates.append(images / (time.perf_counter() - t0))
    batches.close()
    del loader, batches
    return {"images_per_s": summarize(rates), "warmup_s": warmup_s}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a converted dataset (tools/convert_imagenet.py OUT)")
    p.add_argument("--split", default="train")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                   help="CPU threads or processes per loader to sweep (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batches", type=int, default=20, help="batches per timed window (default: %(default)s)")
    p.add_argument("--window-s", type=float, default=0.0,
                   help="a window also lasts at least this many seconds (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10, help="batches before the clock (default: %(default)s)")
    p.add_argument("--views", type=int, default=1, choices=[1, 2],
                   help="2: the two-view (SimCLR) augmentation; images/s then counts views (default: %(default)s)")
    p.add_argument("--dali-hw-load", type=float, nargs="+", default=None,
                   help="GPU only: also sweep DALI's hw_decoder_load over these values")
    p.add_argument("--results", type=Path, default=record.RESULTS, help="where the JSON and markdown go")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args


def configurations(args, device: torch.device):
    """(kind, workers, options, label) to measure; synthetic needs no workers, so it runs once."""
    for kind in args.kinds:
        if kind == "synthetic":
            yield kind, 0, None, "synthetic"
            continue
        for workers in args.workers:
            yield kind, workers, None, kind
            if kind == "dali" and device.type == "cuda":
                for load in args.dali_hw_load or []:
                    yield kind, workers, {"hw_decoder_load": load}, f"dali hw_decoder_load={load}"


def markdown(rows: list[dict], env: dict, settings: dict, ceiling: dict) -> str:
    lines = [f"Loader images/s, median of {settings['repeats']} windows of {settings['batches']} batches of "
             f"{settings['batch_size']} at {settings['image_size']} px, on {settings['device']}.",
             f"Hardware: {env['cpu']} ({env['cores']} cores){', ' + env['gpu'] if env['gpu'] else ''}. "
             f"Commit {env['commit']}.", "",
             "| loader | workers | images/s | spread (min-max) | vs torchvision |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["images_per_s"]
        ratio = f"{r['vs_torchvision']:.2f}x" if r.get("vs_torchvision") else "-"
        lines.append(f"| {r['label']} | {r['workers'] or '-'} | {s['median']:,.0f} | {s['min']:,.0f}-{s['max']:,.0f} "
                     f"| {ratio} |")
    per_core = ceiling["images_per_s_per_core"]["median"]
    lines += ["", f"JPEG decode ceiling (PIL, full decode, one core): {per_core:,.0f} images/s per core."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    console = Console()
    rows, failed = [], []
    for kind, workers, options, label in configurations(args, device):
        console.print(f"[dim]measuring {label}, {workers or '-'} workers ...[/dim]")
        try:
            result = measure(kind, args.data, workers=workers, device=device, args=args, options=options)
        except LoaderUnavailable as e:
            console.print(f"[yellow]skipped {kind}: {e}[/yellow]")
            continue
        except Exception as e:  # one broken configuration must not cost the others' figures
            console.print(f"[red]{label}, {workers} workers failed: {type(e).__name__}: {e}[/red]")
            failed.append({"label": label, "workers": workers, "error": f"{type(e).__name__}: {e}"})
            continue
        if args.views == 2:  # its own label: the report must not merge it with the one-view rows
            label += " 2 views"
        rows.append({"label": label, "kind": kind, "workers": workers, "options": options or {}, "views": args.views,
                     **result})
    baseline = {r["workers"]: r["images_per_s"]["median"] for r in rows if r["kind"] == "torchvision"}
    for r in rows:
        if r["kind"] != "torchvision" and r["workers"] in baseline:
            r["vs_torchvision"] = r["images_per_s"]["median"] / baseline[r["workers"]]
    settings = {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()}
    settings["max_resolution"] = load_manifest(args.data)["settings"]["max_resolution"]  # 0: full size
    goals = {"cpu_ratio_vs_torchvision": goals_.CPU_RATIO, "gpu_images_per_s": goals_.GPU_LOADER}
    ceiling = decode_ceiling(args.data, args.split, images=64)
    path = write_record("loaders", {"settings": settings, "goals": goals, "results": rows, "failed": failed,
                                    "decode_ceiling": ceiling}, args.results)
    path.with_suffix(".md").write_text(markdown(rows, record.environment(), settings, ceiling))

    table = Table(title=f"loader images/s, median of {args.repeats} (batch {args.batch_size}, {args.image_size} px, "
                        f"{device.type})")
    for column in ("loader", "workers", "images/s", "min-max", "vs torchvision", "warm-up s"):
        table.add_column(column, justify="right")
    for r in rows:
        s = r["images_per_s"]
        table.add_row(r["label"], str(r["workers"] or "-"), f"{s['median']:,.0f}", f"{s['min']:,.0f}-{s['max']:,.0f}",
                      f"{r['vs_torchvision']:.2f}x" if r.get("vs_torchvision") else "-", f"{r['warmup_s']:.1f}")
    console.print(table)
    console.print(f"one core decodes {ceiling['images_per_s_per_core']['median']:,.0f} of these JPEGs per second "
                  f"(PIL, full decode): the CPU decode ceiling is that times the workers")
    console.print(f"record: {path} (and .md)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
