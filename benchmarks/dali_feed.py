"""How much of the training thread the dali loader's index reader takes: the time the thread that trains spends
inside next() per batch with the source's host work (one pread per sample, the JPEG header walks of a first
epoch, the draws) made on that thread (DaliOptions.feed_ahead 0) against made ahead on read-ahead threads, from
the page cache and with the shards' pages dropped, side by side in one run; and what the read-ahead costs in
memory and start-up.

    python -m benchmarks.dali_feed --data OUT [--feed-ahead 0 4] [--batch-size 64] [--image-size 128]
                                   [--batches 16] [--repeats 5] [--step-ms 0] [--device cpu] [--dry-run]

The consumer stands for a training step: after each batch it sleeps --step-ms (0: twice the pipeline's own time
per batch, measured first with nothing else to do), while DALI decodes and the read-ahead threads read. So next()
holds the training thread's share of the work (the source's, when it runs there, handing the batch to DALI,
taking the outputs), not the decode. A sleep leaves the GIL free, as a GPU step that waits on the device does.

Each configuration's loader is built once, after a throwaway one that pays DALI's one-time start, and warmed up
outside the clock. Then, per repeat and cache state, one window per configuration, their order reversed every
other repeat (ABBA) so that the noise of a shared machine hits all alike. A window starts a new pipeline at a new
epoch (set_epoch), reads LEAD batches outside the clock (the pipeline's and the read-ahead's first fill), then
times --batches calls of next(): wall time (`next_ms`) and the training thread's CPU time (`next_cpu_ms`,
time.thread_time: what it computed rather than waited for). Each figure is the median over the window's batches
(`p90` the 90th percentile), summarized over the repeats (median, spread).

Cache states: `warm`, the split's shards read whole beforehand; `cold`, each shard's pages dropped with
posix_fadvise(POSIX_FADV_DONTNEED) before the window (no root needed). How cold it was goes in the record: the
share of the shards' pages still resident after the drop and after the window (mincore), the bytes this process
read from storage during the window (/proc/self/io) against the JPEG bytes the window consumed, and the time of a
pread of one sample, cold and warm.

Start-up and memory, per configuration, --starts times, alternating between the configurations: `first_batch_s`,
from build_loader to the first batch of a new loader; `seek_s`, from set_epoch(e, k) mid-epoch (a new pipeline on
the same source and read-ahead threads) to its first batch. `rss_mb`: the process's resident memory that building
and warming the loader added (the configurations are built one after the other, in --feed-ahead's order);
`ahead_mb`: the JPEG bytes the read-ahead holds (feed_ahead x batch x the mean stored JPEG).
Writes benchmarks/results/dali_feed-<stamp>.json (or into --results).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import record
from benchmarks.loaders import first_batch
from benchmarks.record import summarize, write_record
from pipelines import build_loader
from pipelines.formats.manifest import dali_shards, load_manifest
from pipelines.formats.webdataset import ShardReader

STATES = ("warm", "cold")
PREAD_SAMPLES = 64  # samples timed cold and warm to say how cold "cold" was
DRY_RUN = dict(batch_size=8, image_size=32, batches=3, repeats=1, starts=1, step_ms=20.0, feed_ahead=[0, 2])


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def storage_read_bytes() -> int | None:
    """Bytes this process has made the kernel fetch from storage (/proc/self/io), None where unreadable."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def resident_share(paths: list[str]) -> float:
    """The share of these files' pages in the page cache (mincore on a private mapping of each)."""
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
            view = (ctypes.c_char * size).from_buffer(mapped)
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            del view
        resident += sum(v & 1 for v in vector)
        total += pages
    return resident / total if total else 0.0


def drop_pages(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_pages(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def pread_ms(reader: ShardReader, samples: list[int]) -> float:
    """Median time of one sample's pread, in ms."""
    times = []
    for i in samples:
        start = time.perf_counter()
        reader.read(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def make_loader(args, ahead: int):
    return build_loader("dali", args.data, args.split, batch_size=args.batch_size, image_size=args.image_size,
                        train=True, device=torch.device(args.device), dtype=torch.float32, rank=0, world_size=1,
                        seed=0, workers=args.workers, options={"feed_ahead": ahead})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def window(loader, epoch: int, *, lead: int, batches: int, step_s: float, device: str) -> dict:
    """One window (module docstring): per-batch wall and thread CPU time of next(), in ms."""
    loader.set_epoch(epoch)
    batches_iter = iter(loader)
    wall, cpu = [], []
    for k in range(lead + batches):
        start, start_cpu = time.perf_counter(), time.thread_time()
        next(batches_iter)
        elapsed, elapsed_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        if k >= lead:
            wall.append(elapsed * 1e3)
            cpu.append(elapsed_cpu * 1e3)
        time.sleep(step_s)  # the training step
    batches_iter.close()
    sync(device)
    return {"next_ms": statistics.median(wall), "p90_ms": percentile(wall, 0.9), "max_ms": max(wall),
            "mean_ms": statistics.fmean(wall), "next_cpu_ms": statistics.median(cpu)}


def pipeline_batch_ms(loader, epoch: int, lead: int, batches: int, device: str) -> float:
    """The pipeline's own time per batch: next() back to back, nothing else to do."""
    loader.set_epoch(epoch)
    batches_iter = iter(loader)
    for _ in range(lead):
        next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    sync(device)
    batches_iter.close()
    return (time.perf_counter() - start) / batches * 1e3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a converted dataset (tools/convert_imagenet.py OUT)")
    p.add_argument("--split", default="train")
    p.add_argument("--feed-ahead", type=int, nargs="+", default=[0, 4],
                   help="DaliOptions.feed_ahead values compared; 0: on the training thread (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="DALI's threads (default: the cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, default=16, help="timed batches per window (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="windows per configuration and cache state")
    p.add_argument("--starts", type=int, default=3, help="mid-epoch seeks timed per configuration")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="the consumer's sleep per batch; 0: twice the pipeline's time per batch (default)")
    p.add_argument("--states", nargs="+", default=list(STATES), choices=STATES)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: checks that the benchmark runs (seconds)")
    p.add_argument("--results", type=Path, default=record.RESULTS, help="where the JSON goes")
    args = p.parse_args(argv)
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    manifest = load_manifest(args.data)
    reader = ShardReader(dali_shards(args.data, manifest, args.split))
    tars = sorted(set(reader.tars))
    batches_per_epoch = manifest["splits"][args.split]["samples"] // args.batch_size
    depth = 2  # DaliOptions.prefetch_queue_depth's default, which the loaders keep
    lead = depth + max(args.feed_ahead) + 2
    if lead + args.batches > batches_per_epoch:
        raise SystemExit(f"{args.split} has {batches_per_epoch} batches of {args.batch_size} per epoch: a window "
                         f"needs {lead} + --batches {args.batches}; lower --batches or --batch-size")
    mean_jpeg = reader.image_bytes() / len(reader)
    warm_pages(tars)

    throwaway = make_loader(args, 0)  # DALI's one-time start (libraries, plugins) outside every figure
    first_batch(throwaway, 0, 0, torch.device(args.device))
    del throwaway
    gc.collect()

    loaders, startup = {}, {}
    for ahead in args.feed_ahead:  # one after the other, so that each one's memory can be told apart
        before, threads = rss_mb(), threading.active_count()
        loader = make_loader(args, ahead)
        loader.set_epoch(0)
        batches_iter = iter(loader)
        for _ in range(lead + 2):  # warm-up: the pipeline and the read-ahead filled
            next(batches_iter)
        batches_iter.close()
        startup[ahead] = {"rss_mb": rss_mb() - before, "ahead_mb": ahead * args.batch_size * mean_jpeg / 1e6,
                          "threads_added": threading.active_count() - threads}
        loaders[ahead] = loader
    epochs = iter(range(1, 1 << 30))  # every window and seek at an epoch of its own
    mid = batches_per_epoch // 2
    firsts, seeks = ({ahead: [] for ahead in args.feed_ahead} for _ in range(2))
    for repeat in range(args.starts):
        for ahead in (args.feed_ahead if repeat % 2 == 0 else list(reversed(args.feed_ahead))):
            firsts[ahead].append(first_batch(make_loader(args, ahead), 0, 0, torch.device(args.device)))
            gc.collect()  # the fresh loader's pipeline and threads go before the next figure
            seeks[ahead].append(first_batch(loaders[ahead], next(epochs), mid, torch.device(args.device)))
    for ahead in args.feed_ahead:
        startup[ahead] |= {"first_batch_s": summarize(firsts[ahead]), "seek_s": summarize(seeks[ahead])}
    pipeline_ms = pipeline_batch_ms(loaders[args.feed_ahead[0]], next(epochs), lead, args.batches, args.device)
    step_ms = args.step_ms or 2 * pipeline_ms
    console.print(f"pipeline: {pipeline_ms:.1f} ms per batch; the consumer sleeps {step_ms:.1f} ms per batch")

    windows = {(ahead, state): [] for ahead in args.feed_ahead for state in args.states}
    cold = {"resident_after_drop": [], "resident_after_window": [], "storage_read_mb": [], "jpeg_mb": []}
    for repeat in range(args.repeats):
        order = list(args.feed_ahead) if repeat % 2 == 0 else list(reversed(args.feed_ahead))
        for state in args.states:
            for ahead in order:
                if state == "cold":
                    drop_pages(tars)
                    cold["resident_after_drop"].append(resident_share(tars))
                    read_before = storage_read_bytes()
                else:
                    warm_pages(tars)
                figures = window(loaders[ahead], next(epochs), lead=lead, batches=args.batches,
                                 step_s=step_ms / 1e3, device=args.device)
                if state == "cold":
                    read_after = storage_read_bytes()
                    cold["resident_after_window"].append(resident_share(tars))
                    cold["jpeg_mb"].append((lead + args.batches + depth + ahead) * args.batch_size * mean_jpeg / 1e6)
                    if read_before is not None and read_after is not None:
                        cold["storage_read_mb"].append((read_after - read_before) / 1e6)
                windows[(ahead, state)].append(figures)

    results = []
    for (ahead, state), figures in windows.items():
        results.append({"feed_ahead": ahead, "cache": state,
                        **{name: summarize([f[name] for f in figures])
                           for name in ("next_ms", "p90_ms", "max_ms", "mean_ms", "next_cpu_ms")}})
    if "cold" in args.states:
        sample = random.Random(0).sample(range(len(reader)), min(PREAD_SAMPLES, len(reader)))
        drop_pages(tars)
        cold["pread_cold_ms"] = pread_ms(reader, sample)
        cold["pread_warm_ms"] = pread_ms(reader, sample)
        cold = {name: summarize(value) if isinstance(value, list) and value else value for name, value in cold.items()}
    settings = {"data": str(args.data), "split": args.split, "device": args.device, "batch_size": args.batch_size,
                "image_size": args.image_size, "workers": args.workers, "prefetch_queue_depth": depth,
                "feed_ahead": args.feed_ahead, "batches": args.batches, "repeats": args.repeats, "lead": lead,
                "step_ms": step_ms, "step_ms_auto": not args.step_ms, "states": args.states,
                "max_resolution": manifest["settings"]["max_resolution"], "mean_jpeg_bytes": mean_jpeg,
                "samples": len(reader), "dry_run": args.dry_run}
    path = write_record("dali_feed", {"settings": settings, "pipeline_batch_ms": pipeline_ms, "results": results,
                                      "startup": [{"feed_ahead": a, **s} for a, s in startup.items()],
                                      "cold": cold if "cold" in args.states else None}, directory=args.results)
    table = Table(title=f"time inside next() per batch of {args.batch_size}, the consumer sleeping {step_ms:.0f} ms")
    for column in ("feed_ahead", "cache", "next ms", "p90 ms", "CPU ms", "first batch s", "seek s", "RSS MB"):
        table.add_column(column, justify="right")
    for row in results:
        s = startup[row["feed_ahead"]]
        table.add_row(str(row["feed_ahead"]), row["cache"], f"{row['next_ms']['median']:.2f}",
                      f"{row['p90_ms']['median']:.2f}", f"{row['next_cpu_ms']['median']:.2f}",
                      f"{s['first_batch_s']['median']:.2f}", f"{s['seek_s']['median']:.2f}", f"{s['rss_mb']:.0f}")
    console.print(table)
    console.print(f"Record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
