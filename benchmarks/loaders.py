"""Loader throughput as a trainer on ImageNet sees it: images/s of each loader alone inside an epoch, the
cost of an epoch boundary and of a mid-epoch start, and the images/s that projects to over an ImageNet epoch.

    python -m benchmarks.loaders --data OUT [--kinds dali ffcv torchvision synthetic] [--workers 1 2]
                                 [--device cuda] [--batch-size 64] [--image-size 224] [--batches 20]

Each (loader, workers) pair builds its train loader once. The first `--warmup` batches are outside the clock:
they hold FFCV's numba compile (~20 s on 2 cores), DALI's decoder set-up and the worker start. Then, every
clock with the device synchronized at its edges (`sync`), each on an epoch of its own:
- steady state: `--repeats` windows of at least `--batches` batches (and `--window-s` seconds while the epoch
  lasts), each inside one epoch: set_epoch(e), 2 batches to fill the pipeline, then the clock. A window never
  crosses an epoch boundary. `images_per_s` is the median window; `steady_batch_ms` the time per batch it
  implies (`batch_interval_ms`: each window's).
- epoch boundary: set_epoch(e, len - 3), read to the epoch's end, then set_epoch(e + 1) and its first batch:
  the time from the last batch of e to the first of e + 1, median of `--boundaries`, in ms and in batch-times
  (over `steady_batch_ms`). An ImageNet epoch (18,016 batches of 64) pays it once; a short benchmark epoch
  would pay it every few batches, which is why it is measured apart.
- mid-epoch start: set_epoch(e, k) then the first batch, at k = 0, 50 % and 90 % of the epoch, median of
  `--starts`. The contract seeks rather than reads the skipped batches, so 90 % should cost what 0 does.
- the ImageNet epoch: images/s over one epoch of 1,153,051 images (ImageNet-1k's train set less the 10 %
  holdout) at this batch size, from the figures above: batches x images per batch / (batches x interval +
  boundary).
Ratios are taken against the torchvision baseline at the same worker count, from the same run.
Beside the loaders, from one sample of 64 stored JPEGs: the decode ceiling (what one core decodes per second with
PIL), and how hard the JPEGs are to decode against a real photo (benchmarks/jpeg_stats.py: bytes per pixel and
decode ms per megapixel, `data_jpegs`), so that figures from generated data can be read against photos'.

`--rand-augment SPEC` (timm's notation, DeiT's "rand-m9-mstd0.5-inc1"): each real loader's default configuration
is also measured with RandAugment on (pipelines.build_loader's rand_augment), side by side with it off: both
loaders are built and warmed up, then their steady-state windows alternate, off and on, the order reversed every
other repeat (ABBA), so that the noise of a shared machine hits both; before each window the other loader's
workers are given SETTLE_BATCHES of its batch-times to finish the batches they had prefetched. The RandAugment row
has the steady state only (its cost is the in-epoch rate; the epoch boundary and the starts are the off row's,
measured after the on loader is gone) and `vs_rand_augment_off`, its images/s over the off row's. Every row says
`rand_augment`: the spec, or null. The synthetic loader ignores rand_augment (its batch stands for any pixels)
and the option variants (dali reader=webdataset, hw_decoder_load) are measured off only. Writes
benchmarks/results/loaders-<stamp>.json and .md (or into --results).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import goals as goals_
from benchmarks import jpeg_stats, record
from benchmarks.record import record_path, summarize, write_record
from benchmarks.report import EPOCH_HEADERS, epoch_columns, rand_augment_table
from pipelines import KINDS, build_loader
from pipelines.contract import LoaderUnavailable, RandAugment
from pipelines.formats.manifest import load_manifest

IMAGENET_TRAIN_IMAGES = 1_153_051  # ImageNet-1k's 1,281,167 train images less the 10 % holdout
LEAD = 2  # batches after an epoch's start before a window's clock starts: the first ones carry the start
BOUNDARY_TAIL = 3  # batches read at an epoch's end before its boundary is timed
STARTS_AT = (0, 50, 90)  # where in an epoch (%) the first batch after a mid-epoch start is timed
# Alternating two loaders: before a window, the one just closed gets this many of its batch-times to finish what
# it had prefetched (torchvision's persistent workers: prefetch_factor 2 x workers; DALI's queue: 2; FFCV: a
# few), so that its work does not land in the other's window. Capped at SETTLE_MAX_S.
SETTLE_BATCHES = 4
SETTLE_MAX_S = 2.0


def endless(loader):
    """Batches across epochs, reshuffled each epoch, as the trainer reads them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def batch_images(batch) -> int:
    """Images in one batch: (images, labels), or (views, labels) from a two-view loader (each view counts)."""
    images = batch[0]
    return sum(v.shape[0] for v in images) if isinstance(images, (tuple, list)) else images.shape[0]


def decode_ceiling(blobs: list[bytes]) -> dict:
    """What one core decodes per second with PIL (libjpeg-turbo, as every loader here uses on the CPU) from
    the stored JPEGs `blobs`, full decode to RGB, no augmentation. Times the cores, it bounds what any CPU
    loader can reach, so a loader near it is decode-bound and no pipeline change makes it much faster."""
    import io

    from PIL import Image
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


def close(batches) -> None:
    """Ends an iteration left before its epoch's end (a generator's `finally` releases its pipeline)."""
    if hasattr(batches, "close"):
        batches.close()


def check_seeks(loader, kind: str) -> None:
    if "start_batch" not in inspect.signature(loader.set_epoch).parameters:
        raise TypeError(f"the '{kind}' loader's set_epoch takes no start_batch (pipelines/contract.py): it "
                        f"cannot place a window inside an epoch nor start mid-epoch")
    if len(loader) < BOUNDARY_TAIL + 1:
        raise ValueError(f"the '{kind}' loader's epoch has {len(loader)} batches; the benchmark needs at least "
                         f"{BOUNDARY_TAIL + 1} (more images, or a smaller --batch-size)")


def window(loader, epoch: int, device: torch.device, args) -> tuple[int, int, float]:
    """(images, batches, seconds) of one steady-state window inside `epoch`."""
    loader.set_epoch(epoch)
    batches = iter(loader)
    for _ in range(LEAD):
        next(batches)
    sync(device)
    t0 = time.perf_counter()
    images = count = 0
    # at least --batches batches and at least --window-s seconds, but never past the epoch's end: a fast
    # loader gets a window long enough to measure, and a slow one (1 worker) does not hold the suite for minutes
    for batch in batches:
        images += batch_images(batch)
        count += 1
        if count >= args.batches and time.perf_counter() - t0 >= args.window_s:
            break
    sync(device)
    elapsed = time.perf_counter() - t0
    close(batches)
    return images, count, elapsed


def epoch_boundary(loader, epoch: int, device: torch.device) -> float:
    """Seconds from the last batch of `epoch` to the first batch of the next one."""
    start = len(loader) - BOUNDARY_TAIL
    loader.set_epoch(epoch, start)
    batches = iter(loader)
    for _ in range(BOUNDARY_TAIL):
        next(batches)
    sync(device)
    t0 = time.perf_counter()
    extra = sum(1 for _ in batches)  # the epoch's end, as a trainer's for loop meets it
    loader.set_epoch(epoch + 1)
    following = iter(loader)
    next(following)
    sync(device)
    elapsed = time.perf_counter() - t0
    close(following)
    if extra:
        raise RuntimeError(f"set_epoch({epoch}, {start}) yielded {BOUNDARY_TAIL + extra} batches, not the "
                           f"{BOUNDARY_TAIL} left of its {len(loader)}: the loader does not seek")
    return elapsed


def first_batch(loader, epoch: int, start_batch: int, device: torch.device) -> float:
    """Seconds from set_epoch(epoch, start_batch) to the first batch, as a resumed run waits for it."""
    sync(device)
    t0 = time.perf_counter()
    loader.set_epoch(epoch, start_batch)
    batches = iter(loader)
    next(batches)
    sync(device)
    elapsed = time.perf_counter() - t0
    close(batches)
    return elapsed


def imagenet_epoch(batch_size: int, images_per_batch: float, interval_s: float, boundary_s: float) -> dict:
    """Images/s over one ImageNet train epoch at this batch size: every batch at the in-epoch interval, plus
    one epoch boundary."""
    batches = IMAGENET_TRAIN_IMAGES // batch_size  # train drops the last partial batch
    return {"imagenet_epoch_batches": batches,
            "imagenet_epoch_images_per_s": batches * images_per_batch / (batches * interval_s + boundary_s)}


def start(kind: str, data: Path, *, workers: int, device: torch.device, args, options: dict | None,
          rand_augment: RandAugment | None = None):
    """The train loader, built and past its warm-up: (loader, seconds from the build to the warm-up's end)."""
    begin = time.perf_counter()
    loader = build_loader(kind, data, args.split, batch_size=args.batch_size, image_size=args.image_size,
                          train=True, device=device, dtype=args.dtype, workers=workers, options=options,
                          views=args.views, rand_augment=rand_augment)
    check_seeks(loader, kind)
    warmup = endless(loader)
    for _ in range(args.warmup):
        next(warmup)
    warmup.close()
    sync(device)
    return loader, time.perf_counter() - begin


def steady(windows: list[tuple[int, int, float]]) -> dict:
    """The steady-state figures of a loader's windows; `_interval_s` (dropped from the record) feeds the rest.
    The interval is the one the median images/s implies (the median window's with an odd number of windows): the
    batch-times and the projection follow the headline figure, which an even count's mean of two would not."""
    rates = [images / seconds for images, _, seconds in windows]
    images_per_batch = sum(images for images, _, _ in windows) / sum(count for _, count, _ in windows)
    interval = images_per_batch / statistics.median(rates)
    return {"images_per_s": summarize(rates),
            "batch_interval_ms": summarize([1e3 * seconds / count for _, count, seconds in windows]),
            "steady_batch_ms": 1e3 * interval, "window_batches": [count for _, count, _ in windows],
            "_interval_s": interval, "_images_per_batch": images_per_batch}


def epoch_figures(loader, epochs, device: torch.device, args, interval: float, images_per_batch: float) -> dict:
    """The epoch boundary, the first batch after mid-epoch starts, and the ImageNet-epoch projection."""
    batches = len(loader)
    boundaries = []
    for _ in range(args.boundaries):
        boundaries.append(epoch_boundary(loader, next(epochs), device))
        next(epochs)  # the boundary's second epoch, started there
    at = {str(p): min(batches - 1, batches * p // 100) for p in STARTS_AT}
    firsts = {p: [first_batch(loader, next(epochs), k, device) for _ in range(args.starts)] for p, k in at.items()}
    boundary = statistics.median(boundaries)
    first = {p: summarize([1e3 * s for s in values]) for p, values in firsts.items()}
    return {"epoch_batches": batches, "epoch_boundary_ms": summarize([1e3 * s for s in boundaries]),
            "epoch_boundary_batches": boundary / interval, "first_batch_ms": first, "first_batch_at": at,
            "first_batch_90_over_0": first["90"]["median"] / first["0"]["median"],
            **imagenet_epoch(args.batch_size, images_per_batch, interval, boundary)}


def public(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if not k.startswith("_")}


def measure(kind: str, data: Path, *, workers: int, device: torch.device, args, options: dict | None) -> dict:
    loader, warmup_s = start(kind, data, workers=workers, device=device, args=args, options=options)
    epochs = itertools.count(1)  # every measurement on an epoch of its own, as a trainer's come
    figures = steady([window(loader, next(epochs), device, args) for _ in range(args.repeats)])
    figures |= epoch_figures(loader, epochs, device, args, figures["_interval_s"], figures["_images_per_batch"])
    del loader
    return {**public(figures), "warmup_s": warmup_s}


def settle(interval_s: float) -> None:
    """Lets the loader whose window just closed (or whose warm-up did) finish its prefetched batches before the
    other one's window: SETTLE_BATCHES of its batch-times, at most SETTLE_MAX_S."""
    time.sleep(min(SETTLE_MAX_S, SETTLE_BATCHES * interval_s))


def measure_pair(kind: str, data: Path, *, workers: int, device: torch.device, args, options: dict | None,
                 rand_augment: RandAugment) -> tuple[dict, dict]:
    """(off, on): the loader without and with RandAugment, their windows alternated in one run (module
    docstring). The off figures are measure()'s in full; the on figures the steady state only."""
    off, off_warmup = start(kind, data, workers=workers, device=device, args=args, options=options)
    on, on_warmup = start(kind, data, workers=workers, device=device, args=args, options=options,
                          rand_augment=rand_augment)
    settle(SETTLE_MAX_S)  # the on loader's workers go on prefetching after its warm-up, into the first off window
    epochs = itertools.count(1)
    windows = {"off": [], "on": []}
    loaders = {"off": off, "on": on}
    for repeat in range(args.repeats):
        for which in (("off", "on") if repeat % 2 == 0 else ("on", "off")):
            windows[which].append(window(loaders[which], next(epochs), device, args))
            _, count, seconds = windows[which][-1]
            settle(seconds / count)
    del loaders, on  # the off loader's epoch figures with no second loader beside it
    gc.collect()
    off_figures, on_figures = steady(windows["off"]), steady(windows["on"])
    off_figures |= epoch_figures(off, epochs, device, args, off_figures["_interval_s"],
                                 off_figures["_images_per_batch"])
    del off
    return ({**public(off_figures), "warmup_s": off_warmup},
            {**public(on_figures), "epoch_batches": off_figures["epoch_batches"], "warmup_s": on_warmup})


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
    p.add_argument("--batches", type=int, default=20,
                   help="batches per timed window, inside one epoch (default: %(default)s)")
    p.add_argument("--window-s", type=float, default=0.0,
                   help="a window also lasts at least this many seconds, while its epoch lasts (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="steady-state windows (default: %(default)s)")
    p.add_argument("--boundaries", type=int, default=3, help="epoch boundaries timed (default: %(default)s)")
    p.add_argument("--starts", type=int, default=3,
                   help="mid-epoch starts timed at each of 0, 50 and 90 %% of the epoch (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="batches before the clock (default: %(default)s)")
    p.add_argument("--views", type=int, default=1, choices=[1, 2],
                   help="2: the two-view (SimCLR) augmentation; images/s then counts views (default: %(default)s)")
    p.add_argument("--dali-webdataset", action="store_true",
                   help="also measure DALI's sequential webdataset reader (reader=webdataset) beside its default")
    p.add_argument("--dali-hw-load", type=float, nargs="+", default=None,
                   help="GPU only: also sweep DALI's hw_decoder_load over these values")
    p.add_argument("--rand-augment", metavar="SPEC", default=None,
                   help="also measure each real loader with RandAugment on, side by side with it off (timm's "
                        "notation, e.g. rand-m9-mstd0.5-inc1, DeiT's)")
    p.add_argument("--results", type=Path, default=record.RESULTS, help="where the JSON and markdown go")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.rand_augment is not None:
        try:
            args.rand_augment_spec = RandAugment.parse(args.rand_augment)
        except ValueError as e:
            p.error(f"--rand-augment: {e}")
        if args.rand_augment_spec is None:
            p.error("--rand-augment: give a spec such as rand-m9-mstd0.5-inc1 (leave the flag out for none)")
        if args.views != 1:
            p.error("--rand-augment is for --views 1: the two-view loaders apply SimCLR's augmentation")
    return args


def configurations(args, device: torch.device):
    """(kind, workers, options, label) to measure; synthetic needs no workers, so it runs once."""
    for kind in args.kinds:
        if kind == "synthetic":
            yield kind, 0, None, "synthetic"
            continue
        for workers in args.workers:
            yield kind, workers, None, kind
            if kind == "dali" and args.dali_webdataset:
                yield kind, workers, {"reader": "webdataset"}, "dali reader=webdataset"
            if kind == "dali" and device.type == "cuda":
                for load in args.dali_hw_load or []:
                    yield kind, workers, {"hw_decoder_load": load}, f"dali hw_decoder_load={load}"


def markdown(rows: list[dict], env: dict, settings: dict, ceiling: dict, jpegs: dict) -> str:
    batches = rows[0]["epoch_batches"] if rows else "?"
    lines = [f"Loader images/s inside an epoch, median of {settings['repeats']} windows of >= {settings['batches']} "
             f"batches of {settings['batch_size']} at {settings['image_size']} px, on {settings['device']}; epochs "
             f"of {batches} batches. Epoch boundary: last batch of one epoch to the first of the next (median of "
             f"{settings['boundaries']}). First batch after set_epoch(e, k) at 0, 50 and 90 % of the epoch (median "
             f"of {settings['starts']}). ImageNet epoch: {IMAGENET_TRAIN_IMAGES:,} images at this batch size, "
             f"projected from those.",
             f"Hardware: {env['cpu']} ({env['cores']} cores){', ' + env['gpu'] if env['gpu'] else ''}. "
             f"Commit {env['commit']}.", "",
             f"| loader | workers | images/s | spread (min-max) | vs torchvision | {' | '.join(EPOCH_HEADERS)} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["images_per_s"]
        ratio = f"{r['vs_torchvision']:.2f}x" if r.get("vs_torchvision") else "-"
        lines.append(f"| {r['label']} | {r['workers'] or '-'} | {s['median']:,.0f} | {s['min']:,.0f}-{s['max']:,.0f} "
                     f"| {ratio} | {' | '.join(epoch_columns(r))} |")
    paired = [r for r in rows if r.get("rand_augment")]
    if paired:
        lines += ["", f"RandAugment {paired[0]['rand_augment']} on against off: the same loader built twice, their "
                  "windows alternated in this run; in-epoch images/s (the on rows have no epoch-boundary or start "
                  "figures: those are the off rows').", "", *rand_augment_table(paired)]
    per_core = ceiling["images_per_s_per_core"]["median"]
    lines += ["", f"JPEG decode ceiling (PIL, full decode, one core): {per_core:,.0f} images/s per core.",
              "", jpeg_stats.summary(jpegs)]
    return "\n".join(lines) + "\n"


def add_ratios(rows: list[dict]) -> None:
    """vs_torchvision: each loader over the torchvision baseline at the same worker count and RandAugment (on
    rows against torchvision on)."""
    baseline = {(r["workers"], r.get("rand_augment")): r["images_per_s"]["median"]
                for r in rows if r["kind"] == "torchvision"}
    for r in rows:
        key = (r["workers"], r.get("rand_augment"))
        if r["kind"] != "torchvision" and key in baseline:
            r["vs_torchvision"] = r["images_per_s"]["median"] / baseline[key]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    console = Console()
    settings = {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()
                if k != "rand_augment_spec"}
    settings["max_resolution"] = load_manifest(args.data)["settings"]["max_resolution"]  # 0: full size
    goals = {"cpu_ratio_vs_torchvision": goals_.CPU_RATIO, "cpu_epoch_boundary_batches": goals_.CPU_EPOCH_START,
             "cpu_first_batch_90_over_0": goals_.CPU_RESUME, "gpu_images_per_s": goals_.GPU_LOADER,
             "gpu_ffcv_512_images_per_s_per_core": goals_.FFCV_512_PER_CORE}
    sample = jpeg_stats.stored_jpegs(args.data, args.split, images=64)
    ceiling = decode_ceiling(sample)
    jpegs = jpeg_stats.measure(sample, repeats=3)  # the data against a real photo: what these figures stand for
    path, rows, failed = record_path("loaders", args.results), [], []

    def save() -> None:  # after every configuration: a time limit that ends the run keeps the rows measured
        add_ratios(rows)
        write_record("loaders", {"settings": settings, "goals": goals, "results": rows, "failed": failed,
                                 "decode_ceiling": ceiling, "data_jpegs": jpegs}, path=path)
        path.with_suffix(".md").write_text(markdown(rows, record.environment(), settings, ceiling, jpegs))

    for kind, workers, options, label in configurations(args, device):
        # RandAugment on against off: each real loader's default configuration (module docstring)
        pair = args.rand_augment is not None and kind != "synthetic" and options is None
        console.print(f"[dim]measuring {label}{' off and + ' + args.rand_augment if pair else ''}, "
                      f"{workers or '-'} workers ...[/dim]")
        try:
            if pair:
                try:
                    result, on = measure_pair(kind, args.data, workers=workers, device=device, args=args,
                                              options=options, rand_augment=args.rand_augment_spec)
                except LoaderUnavailable:
                    raise
                except Exception as e:  # RandAugment's failure must not cost the loader's own figures
                    console.print(f"[red]{label} + {args.rand_augment}, {workers} workers failed: "
                                  f"{type(e).__name__}: {e}; measuring {label} alone[/red]")
                    failed.append({"label": f"{label} + {args.rand_augment}", "workers": workers,
                                   "error": f"{type(e).__name__}: {e}"})
                    pair = False
            if not pair:
                result = measure(kind, args.data, workers=workers, device=device, args=args, options=options)
        except LoaderUnavailable as e:
            console.print(f"[yellow]skipped {kind}: {e}[/yellow]")
            continue
        except Exception as e:  # one broken configuration must not cost the others' figures
            console.print(f"[red]{label}, {workers} workers failed: {type(e).__name__}: {e}[/red]")
            failed.append({"label": label, "workers": workers, "error": f"{type(e).__name__}: {e}"})
            save()
            continue
        if args.views == 2:  # its own label: the report must not merge it with the one-view rows
            label += " 2 views"
        common = {"kind": kind, "workers": workers, "options": options or {}, "views": args.views}
        rows.append({"label": label, **common, "rand_augment": None, **result})
        if pair:  # its own label too: the report merges rows by (label, workers)
            off = {"label": label, "images_per_s": result["images_per_s"]["median"]}
            rows.append({"label": f"{label} + {args.rand_augment}", **common, "rand_augment": args.rand_augment,
                         **on, "rand_augment_off": off,
                         "vs_rand_augment_off": on["images_per_s"]["median"] / off["images_per_s"]})
        save()
    save()

    table = Table(title=f"loader images/s inside an epoch, median of {args.repeats} (batch {args.batch_size}, "
                        f"{args.image_size} px, {device.type})")
    for column in ("loader", "workers", "images/s", "min-max", "vs torchvision", *EPOCH_HEADERS, "warm-up s"):
        table.add_column(column, justify="right")
    for r in rows:
        s = r["images_per_s"]
        table.add_row(r["label"], str(r["workers"] or "-"), f"{s['median']:,.0f}", f"{s['min']:,.0f}-{s['max']:,.0f}",
                      f"{r['vs_torchvision']:.2f}x" if r.get("vs_torchvision") else "-", *epoch_columns(r),
                      f"{r['warmup_s']:.1f}")
    console.print(table)
    paired = [r for r in rows if r.get("rand_augment")]
    if paired:
        console.print("\n".join(rand_augment_table(paired)))
    console.print(f"one core decodes {ceiling['images_per_s_per_core']['median']:,.0f} of these JPEGs per second "
                  f"(PIL, full decode): the CPU decode ceiling is that times the workers")
    console.print(jpeg_stats.summary(jpegs))
    console.print(f"record: {path} (and .md)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
