#!/usr/bin/env python
"""Pack ImageNet once, offline, into FFCV (.beton) and DALI (webdataset shards + index) formats.

    python tools/convert_imagenet.py SRC OUT [--formats ffcv,dali] [--max-resolution 512] ...

SRC is an ImageFolder tree, a Kaggle ILSVRC download or the official ILSVRC2012 tars (auto-detected).
Interrupt it at any time and rerun the same command: it resumes. docs/converting.md has the options.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from pipelines.convert.job import ConvertError, ConvertSettings, convert  # noqa: E402
from pipelines.convert.sources import SourceError  # noqa: E402

DEFAULTS = ConvertSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="ImageNet source directory")
    p.add_argument("out", type=Path, help="output directory (created; must be empty or a previous output)")
    p.add_argument("--formats", default=",".join(DEFAULTS.formats),
                   help="comma-separated output formats: ffcv, dali (default: both)")
    p.add_argument("--max-resolution", type=int, default=DEFAULTS.max_resolution,
                   help="cap on the longer side in pixels; 0 keeps full size (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=DEFAULTS.jpeg_quality,
                   help="quality of re-encoded images (default: %(default)s)")
    p.add_argument("--holdout-fraction", type=float, default=DEFAULTS.holdout_fraction,
                   help="class-stratified share of train kept as the holdout split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="decides the holdout choice and the train order (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=DEFAULTS.shard_size,
                   help="samples per webdataset shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="decoding processes (default: all cores, %(default)s)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of listing it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUT that was converted with other settings")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    settings = ConvertSettings(
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
        holdout_fraction=args.holdout_fraction, seed=args.seed, shard_size=args.shard_size)
    try:
        convert(args.src, args.out, settings, workers=args.workers, strict=args.strict,
                overwrite=args.overwrite, console=console)
    except (ConvertError, SourceError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print(f"\ninterrupted: finished shards are kept in {args.out}; "
                      "rerun the same command to resume.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
