"""Converter throughput: images/s per core at the default settings, on the generated sample set.

    python -m benchmarks.convert [--repeats 5] [--workers 1 2] [--sample DIR]

Each configuration converts the same sample tree into a fresh OUT. One warm-up run (imports, page cache)
is outside the clock; the figures are medians of the repeats, taken from the converter's own phase timing:
- `shards`: scan excluded; reading, decoding once, re-encoding where needed, and writing the DALI shards;
- `betons`: FFCV .beton files written from the shards (no decoding);
- `total`: everything, the scan and the manifest included.
Per core = images/s divided by the worker processes (the parent process writes the tars besides).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.record import summarize, write_record
from pipelines.convert.job import ConvertSettings, convert
from pipelines.convert.sample import make_sample

GOAL_PER_CORE = 150  # images/s per core at the default settings: the converter's speed goal


def run(sample: Path, workers: int, scratch: Path) -> dict:
    out = scratch / f"out-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    manifest = convert(sample, out, ConvertSettings(), workers=workers, console=Console(quiet=True))
    images = sum(s["samples"] + s["rejected"] for s in manifest["splits"].values())
    return {"images": images, **manifest["timing"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--sample", type=Path, help="an existing sample tree (default: generate one)")
    p.add_argument("--classes", type=int, default=10, help="classes of the generated tree (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=60, help="train images per class (default: %(default)s)")
    p.add_argument("--results", type=Path, default=None, help="where the record goes (default: benchmarks/results)")
    args = p.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        sample = args.sample
        if sample is None:
            sample = scratch / "sample"
            make_sample(sample, classes=args.classes, per_class=args.per_class, workers=max(args.workers))
        run(sample, max(args.workers), scratch)  # warm-up, outside the clock
        results = {}
        for workers in args.workers:
            runs = [run(sample, workers, scratch) for _ in range(args.repeats)]
            images = runs[0]["images"]
            results[str(workers)] = {
                "images": images,
                **{f"{phase}_images_per_s_per_core": summarize([images / r[f"{phase}_s"] / workers for r in runs])
                   for phase in ("shards", "betons", "total")},
                "seconds": {phase: summarize([r[f"{phase}_s"] for r in runs])
                            for phase in ("scan", "shards", "betons", "total")},
            }
    settings = {**ConvertSettings().__dict__, "formats": list(ConvertSettings().formats)}
    sample_desc = str(args.sample) if args.sample else \
        f"generated: {args.classes} classes x ({args.per_class} train + 10 val)"
    path = write_record("convert", {"settings": settings, "sample": sample_desc,
                                    "goal_images_per_s_per_core": GOAL_PER_CORE, "results": results},
                        args.results)
    table = Table(title=f"converter images/s per core (median of {args.repeats}); goal {GOAL_PER_CORE}")
    for column in ("workers", "images", "shards (decode once)", "betons (no decode)", "end to end"):
        table.add_column(column, justify="right")
    for workers, r in results.items():
        table.add_row(workers, str(r["images"]),
                      *(f"{r[f'{phase}_images_per_s_per_core']['median']:,.0f}"
                        for phase in ("shards", "betons", "total")))
    console.print(table)
    console.print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
