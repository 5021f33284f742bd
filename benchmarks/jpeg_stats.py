"""How hard stored JPEGs are to decode, beside a real photo: bytes per pixel and Pillow's decode ms per megapixel.

    python -m benchmarks.jpeg_stats PATH [--split train] [--images 200] [--repeats 5] [--json]

PATH is a converted dataset (tools/convert_imagenet.py OUT: a sample of the split's stored JPEGs, read from its
webdataset shards) or any folder of JPEG files (the sample generator's tree, an ImageNet folder).

A loader's speed depends on the JPEGs it decodes: libjpeg-turbo's and nvJPEG's Huffman stage costs in proportion
to the compressed bytes, so smooth synthetic images flatter every loader. Two figures say how the data compares:
- bytes per pixel: the sample's JPEG bytes over its pixels (ImageNet's train set: about 0.6, a 138 GB tar over
  1.28 M images of about 470 x 390 px).
- decode ms per megapixel: Pillow, one thread, full decode (`Image.load`), in the thread's CPU time. After an
  untimed pass, each repeat takes every image in turn, decodes it DECODES times in a row and keeps the fastest
  (the decode's own cost: the slower ones carry what other processes on a shared machine did to the caches),
  per megapixel; the repeat's figure is the interquartile mean over the images (the middle half), and the
  figure the median of the repeats. Per image, not the total over total pixels: that would be decided by the
  few largest (in the generated trees, the 3 % of 1,600-4,000-px images hold half the pixels).
The reference: a real photo that matplotlib ships (sample_data/grace_hopper.jpg), cropped to ImageNet's commonest
shapes at three places and re-encoded at quality 90 (4:2:0, baseline); where the sample's largest side is smaller
than those shapes' (a dataset converted with --max-resolution 256), the shapes are scaled to fit it, as the
converter would have stored a real photo: a small image's fixed decode costs weigh more per megapixel, and the
two must pay them alike. It is timed in the same repeats as the data, a reference image after each data image,
so that the noise of a shared machine hits both; the decode ratio is the median of the repeats' ratios.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from functools import lru_cache
from pathlib import Path

from PIL import Image

from benchmarks.record import summarize

REFERENCE_PHOTO = "grace_hopper.jpg"  # in matplotlib's mpl-data/sample_data, shipped with the wheel
REFERENCE_QUALITY = 90
REFERENCE_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500))  # ImageNet's commonest
REFERENCE_CROPS = 3
IMAGENET_BYTES_PER_PIXEL = 0.6  # ImageNet-1k's train tar (138 GB) over 1.28 M images of about 470 x 390 px
JPEG_SUFFIXES = {".jpg", ".jpeg"}
DECODES = 3  # per image and repeat; the fastest counts


def reference_sizes(largest_side: int | None = None) -> tuple[tuple[int, int], ...]:
    """REFERENCE_SIZES, each scaled down (aspect kept) to fit `largest_side` where it is smaller than theirs."""
    top = max(max(s) for s in REFERENCE_SIZES)
    if largest_side is None or largest_side >= top:
        return REFERENCE_SIZES
    return tuple((max(1, round(w * largest_side / top)), max(1, round(h * largest_side / top)))
                 for w, h in REFERENCE_SIZES)


@lru_cache(maxsize=4)
def reference_jpegs(sizes: tuple[tuple[int, int], ...] = REFERENCE_SIZES) -> tuple[bytes, ...]:
    """The reference photo at each of `sizes`, cropped to the size's aspect at REFERENCE_CROPS places along the
    photo (from one end to the other: the crops differ in what they show, and so in their cost), resized
    (Lanczos) and re-encoded at REFERENCE_QUALITY."""
    from matplotlib import cbook
    photo = Image.open(cbook.get_sample_data(REFERENCE_PHOTO, asfileobj=False)).convert("RGB")
    out = []
    for w, h in sizes:
        cw, ch = (round(photo.height * w / h), photo.height) if photo.width * h > w * photo.height else \
            (photo.width, round(photo.width * h / w))
        for k in range(REFERENCE_CROPS):
            left = (photo.width - cw) * k // (REFERENCE_CROPS - 1)
            top = (photo.height - ch) * k // (REFERENCE_CROPS - 1)
            im = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=REFERENCE_QUALITY, subsampling=2)
            out.append(buf.getvalue())
    return tuple(out)


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    return list(range(n)) if k >= n else [i * n // k for i in range(k)]


def stored_jpegs(data: Path, split: str = "train", images: int = 200) -> list[bytes]:
    """Up to `images` stored JPEGs of a converted dataset's split, spread over it, from its webdataset shards."""
    from pipelines.formats.manifest import dali_shards, load_manifest
    from pipelines.formats.webdataset import ShardReader
    reader = ShardReader(dali_shards(data, load_manifest(data), split))
    return [reader.read(i)[0] for i in spread(len(reader), images)]


def folder_jpegs(root: Path, images: int = 200) -> list[bytes]:
    """Up to `images` RGB JPEG files under a folder (named .jpg or .jpeg, any case), spread over their sorted
    paths. A file that is not a complete RGB JPEG (the generator's --quirks put PNGs, CMYK and broken files under
    .JPEG names; the converter re-encodes or rejects those) is left out."""
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())
    out = []
    for i in spread(len(paths), images):
        blob = paths[i].read_bytes()
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    continue
                im.load()
        except Exception:  # truncated, empty or not an image
            continue
        out.append(blob)
    return out


def pixels(blob: bytes) -> int:
    with Image.open(io.BytesIO(blob)) as im:
        return im.width * im.height


def largest_side(blobs) -> int:
    def side(blob: bytes) -> int:
        with Image.open(io.BytesIO(blob)) as im:
            return max(im.size)
    return max(side(b) for b in blobs)


def bytes_per_pixel(blobs) -> float:
    return sum(len(b) for b in blobs) / sum(pixels(b) for b in blobs)


def decode_ms(blob: bytes) -> float:
    """The CPU time of one full decode on this thread, in ms: the time the thread waits for a core that other
    processes hold does not count."""
    t0 = time.thread_time()
    with Image.open(io.BytesIO(blob)) as im:
        im.load()
    return 1e3 * (time.thread_time() - t0)


def ms_per_mp(blob: bytes, megapixels: float) -> float:
    """An image's decode cost: the fastest of DECODES in a row, per megapixel. The fastest is the decode's own
    cost; the slower ones carry what other processes did to the caches meanwhile."""
    return min(decode_ms(blob) for _ in range(DECODES)) / megapixels


def interquartile_mean(values: list[float]) -> float:
    """The mean of the middle half: neither the few tiny images (whose fixed costs are large per megapixel) nor
    the slowest decide it, and unlike the median it does not jump between two clusters of alike images."""
    ordered = sorted(values)
    quarter = len(ordered) // 4
    return statistics.fmean(ordered[quarter:len(ordered) - quarter])


def interleaved_pass(data: list, reference: list) -> tuple[float, float]:
    """One repeat over (JPEG, megapixels) pairs: each data image, then a reference image (cycling through them),
    so that both meet the same load on a shared machine; the interquartile means of their ms per megapixel."""
    costs = {"data": [], "reference": []}
    for i, (blob, mp) in enumerate(data):
        costs["data"].append(ms_per_mp(blob, mp))
        costs["reference"].append(ms_per_mp(*reference[i % len(reference)]))
    for pair in reference[len(data):]:  # a sample smaller than the reference: each reference image once
        costs["reference"].append(ms_per_mp(*pair))
    return interquartile_mean(costs["data"]), interquartile_mean(costs["reference"])


def measure(blobs: list[bytes], repeats: int = 5) -> dict:
    """The sample's figures beside the reference's (module docstring), with data / reference ratios; the decode
    ratio is the median of the repeats' ratios."""
    if not blobs:
        raise ValueError("no JPEGs to measure")
    sizes = reference_sizes(largest_side(blobs))
    reference = list(reference_jpegs(sizes))
    data = [(b, pixels(b) / 1e6) for b in blobs]
    ref = [(b, pixels(b) / 1e6) for b in reference]
    interleaved_pass(data, ref)  # warm-up, untimed: Pillow's decoder set-up, the allocator's pools
    runs = [interleaved_pass(data, ref) for _ in range(repeats)]
    ours = {"images": len(blobs), "bytes_per_pixel": bytes_per_pixel(blobs),
            "decode_ms_per_mp": summarize([d for d, _ in runs])}
    theirs = {"photo": f"matplotlib sample_data/{REFERENCE_PHOTO}", "quality": REFERENCE_QUALITY,
              "sizes": [list(s) for s in sizes], "bytes_per_pixel": bytes_per_pixel(reference),
              "decode_ms_per_mp": summarize([r for _, r in runs])}
    return {**ours, "reference": theirs, "decode_vs_reference": statistics.median(d / r for d, r in runs),
            "bytes_per_pixel_vs_reference": ours["bytes_per_pixel"] / theirs["bytes_per_pixel"],
            "imagenet_bytes_per_pixel": IMAGENET_BYTES_PER_PIXEL}


def summary(stats: dict) -> str:
    """One line for a record's markdown and the console."""
    ref = stats["reference"]
    return (f"Stored JPEGs ({stats['images']} sampled): {stats['bytes_per_pixel']:.3f} bytes/pixel, Pillow decode "
            f"{stats['decode_ms_per_mp']['median']:.2f} ms/MP; the reference photo at quality {ref['quality']}: "
            f"{ref['bytes_per_pixel']:.3f} bytes/pixel, {ref['decode_ms_per_mp']['median']:.2f} ms/MP; decode "
            f"{stats['decode_vs_reference']:.2f}x the reference's (ImageNet's train set: about "
            f"{stats['imagenet_bytes_per_pixel']} bytes/pixel).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a converted dataset (OUT) or a folder of JPEG files")
    p.add_argument("--split", default="train", help="of a converted dataset (default: %(default)s)")
    p.add_argument("--images", type=int, default=200, help="JPEGs sampled (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the sample (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if not args.path.is_dir():
        p.error(f"{args.path} is not a directory")
    if args.images < 1 or args.repeats < 1:
        p.error("--images and --repeats must be at least 1")
    converted = (args.path / "manifest.json").is_file()
    blobs = stored_jpegs(args.path, args.split, args.images) if converted else folder_jpegs(args.path, args.images)
    if not blobs:
        print(f"error: no JPEG files under {args.path}", file=sys.stderr)
        return 1
    stats = measure(blobs, args.repeats)
    print(json.dumps(stats, indent=1) if args.json else summary(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
