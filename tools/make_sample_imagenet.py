#!/usr/bin/env python
"""Generate a small ImageNet look-alike in the ImageFolder layout, for the demo, tests and benchmarks.

    python tools/make_sample_imagenet.py OUT [--classes 10] [--per-class 60] [--val-per-class 10] [--quirks]

- Real ImageNet-1k wnids (from timm's synset table), `train/<wnid>/<wnid>_<n>.JPEG` and
  `val/<wnid>/ILSVRC2012_val_<n>.JPEG`.
- ImageNet-like sizes: most 500 px on the longer side (500x375 above all), aspect ratios 3:4 to 4:3, 3 % very
  large (1,600-4,000 px) and 2 % tiny (24-96 px); JPEG quality 75-95.
- A class is a shape (circle, square, ...) filled with a texture (stripes, dots, ...) in a hue of its own, on
  a random background. Classes differ in three cues at once, so a small model learns them in minutes on a CPU.
- A photo's statistics: muted background colours with edges, and luminance detail with a photo's 1/f spectrum,
  sharp in places and soft in others, over background and shape alike. Its JPEGs take as many bytes per pixel
  as a real photo's and cost Pillow as long to decode (`python -m benchmarks.jpeg_stats OUT` measures both), so
  loader benchmarks on them are not flattered by smooth images.
- Deterministic: each image depends only on (--seed, class, index), so the same flags give the same bytes.
- `--quirks` adds the awkward files real ImageNet has (CMYK, grayscale, PNG named .JPEG, 16-bit, EXIF
  rotation, ...) and broken ones (truncated, empty, not an image), to try the converter's handling.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.convert.sample import make_sample, quirky_files  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=60, help="train images per class (default: %(default)s)")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quirks", action="store_true", help="add quirky and broken files (see above)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; the generator writes into a new directory", file=sys.stderr)
        return 1
    # Written under a temporary name and renamed at the end: an interrupted run leaves no half tree that a
    # later `make demo` would take for a finished one.
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    wnids = make_sample(partial, args.classes, args.per_class, args.val_per_class, args.seed, args.quirks,
                        args.workers, progress=True)
    if args.out.exists():
        args.out.rmdir()
    partial.rename(args.out)
    total = len(wnids) * (args.per_class + args.val_per_class)
    quirks = f" plus {len(quirky_files(wnids, args.seed))} quirky and broken files" if args.quirks else ""
    print(f"wrote {total:,} images of {len(wnids)} classes{quirks} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
