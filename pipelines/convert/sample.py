"""A small ImageNet look-alike in the ImageFolder layout, for the demo, tests and benchmarks
(the CLI is tools/make_sample_imagenet.py).

What the tree holds (real wnids, ImageNet-like sizes, one learnable look per class, determinism by seed,
the quirky and broken files of --quirks) is listed in the CLI's docstring.
"""
from __future__ import annotations

import colorsys
import io
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .imagenet_names import imagenet_1k

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "checker", "waves")
CANVAS = 768  # images are drawn at most this large, then resized: a 4,000-px image costs no more to draw


def imagenet_wnids() -> list[str]:
    return list(imagenet_1k())


def choose_wnids(classes: int) -> list[str]:
    """Spread the classes over ImageNet-1k instead of taking the first (all fish and birds)."""
    wnids = imagenet_wnids()
    if not 1 <= classes <= len(wnids):
        raise SystemExit(f"--classes must be between 1 and {len(wnids)}")
    return sorted(wnids[i * len(wnids) // classes] for i in range(classes))


def class_style(c: int) -> tuple[str, str, float]:
    """Shape, texture and hue of class c. The golden-ratio step keeps hues of nearby classes far apart."""
    return SHAPES[c % len(SHAPES)], TEXTURES[(c // len(SHAPES) + c) % len(TEXTURES)], (c * 0.618034) % 1.0


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    u = rng.random()
    if u < 0.02:
        long = int(rng.integers(24, 97))  # tiny, like ImageNet's thumbnails
    elif u < 0.05:
        long = int(rng.integers(1600, 4001))  # very large camera images
    elif u < 0.85:
        long = 500  # the bulk of ImageNet
    else:
        long = int(rng.integers(200, 1001))
    short = math.ceil(long * 3 / 4) if rng.random() < 0.6 else int(rng.integers(math.ceil(0.75 * long), long + 1))
    return (long, short) if rng.random() < 0.75 else (short, long)


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _texture(kind: str, w: int, h: int, hue: float, rng: np.random.Generator) -> Image.Image:
    a = np.array(_rgb(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)), np.float32)
    b = np.array(_rgb(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.5)), np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 14) * max(w, h) / 256
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "solid":
        t = np.zeros_like(x)
    elif kind == "stripes":
        t = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "dots":
        t = ((np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)) > 0.5).astype(np.float32)
    elif kind == "checker":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:  # waves
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (u + 0.3 * period * np.sin(2 * math.pi * v / period)) / period)
    pixels = a * (1 - t[..., None]) + b * t[..., None]
    return Image.fromarray(pixels.astype(np.uint8))


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 3))):
        r = rng.uniform(0.2, 0.38) * min(w, h)
        cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
        cos, sin = math.cos(rot := rng.uniform(0, 2 * math.pi)), math.sin(rot)

        def poly(points, cx=cx, cy=cy, cos=cos, sin=sin):
            return [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in points]

        def regular(n, radius=r, phase=0.0):
            return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
                    for i in range(n)]

        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        elif shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
        elif shape == "square":
            draw.polygon(poly(regular(4, r, math.pi / 4)), fill=255)
        elif shape == "diamond":
            draw.polygon(poly([(0, -r), (r * 0.6, 0), (0, r), (-r * 0.6, 0)]), fill=255)
        elif shape == "triangle":
            draw.polygon(poly(regular(3)), fill=255)
        elif shape == "hexagon":
            draw.polygon(poly(regular(6)), fill=255)
        elif shape == "star":
            pts = [(r * (1 if i % 2 == 0 else 0.45) * math.cos(math.pi * i / 5),
                    r * (1 if i % 2 == 0 else 0.45) * math.sin(math.pi * i / 5)) for i in range(10)]
            draw.polygon(poly(pts), fill=255)
        else:  # cross
            k = r / 3
            draw.polygon(poly([(-k, -r), (k, -r), (k, -k), (r, -k), (r, k), (k, k), (k, r), (-k, r), (-k, k),
                               (-r, k), (-r, -k), (-k, -k)]), fill=255)
    return mask


def render(c: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image of class c at `size`, drawn on a canvas of at most CANVAS px and resized to fit."""
    w, h = size
    scale = min(1.0, CANVAS / max(w, h))
    cw, ch = max(8, round(w * scale)), max(8, round(h * scale))
    shape, texture, hue = class_style(c)
    # Background: a gradient between two muted colours of random hue, plus sensor-like noise.
    top = np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9)), np.float32)
    bottom = np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9)), np.float32)
    ramp = np.linspace(0, 1, ch, dtype=np.float32)[:, None, None]
    bg = top * (1 - ramp) + bottom * ramp
    bg = bg + (rng.integers(0, 21, (ch, cw, 3), dtype=np.uint8) - np.float32(10))  # uniform ±10 grain
    canvas = Image.fromarray(np.clip(np.broadcast_to(bg, (ch, cw, 3)), 0, 255).astype(np.uint8))
    # The texture is computed at half resolution (its periods are 6-14 px at that scale): half the cost.
    fill = _texture(texture, (cw + 1) // 2, (ch + 1) // 2, hue, rng).resize((cw, ch), Image.Resampling.BILINEAR)
    canvas.paste(fill, (0, 0), _shape_mask(shape, cw, ch, rng))
    return canvas if (cw, ch) == (w, h) else canvas.resize((w, h), Image.Resampling.BICUBIC)


def encode(im: Image.Image, rng: np.random.Generator, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(75, 96)), **kwargs)
    return buf.getvalue()


def _make_one(job: tuple) -> None:
    path, seed, c, index = job
    rng = np.random.default_rng([seed, c, index])
    Path(path).write_bytes(encode(render(c, image_size(rng), rng), rng))


def plan_files(out: Path, wnids: list[str], per_class: int, val_per_class: int, seed: int) -> list[tuple]:
    jobs = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            jobs.append((str(out / "train" / wnid / f"{wnid}_{i + 1}.JPEG"), seed, c, i))
    # Validation files are numbered across classes in a shuffled order, as in ILSVRC2012.
    numbers = np.random.default_rng([seed, 10**6]).permutation(len(wnids) * val_per_class) + 1
    for c, wnid in enumerate(wnids):
        for j in range(val_per_class):
            n = int(numbers[c * val_per_class + j])
            jobs.append((str(out / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG"), seed, c, per_class + j))
    return jobs


# ---------------------------------------------------------------- quirks

def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def quirky_files(wnids: list[str], seed: int) -> dict[str, tuple[bytes, str]]:
    """{relative path: (content, expected outcome)}; the outcome is 'copied', 'reencoded' or 'rejected'.
    Each kind occurs in real ImageNet: 22 CMYK JPEGs, one PNG named .JPEG, grayscale images, ..."""
    rng = np.random.default_rng([seed, 7])
    base = render(0, (500, 375), rng)
    w0, w1 = wnids[0], wnids[1 % len(wnids)]
    good = encode(base, rng)
    exif = base.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    sixteen = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
    return {
        f"train/{w0}/{w0}_cmyk.JPEG": (encode(base.convert("CMYK"), rng), "reencoded"),
        f"train/{w0}/{w0}_gray.JPEG": (encode(base.convert("L"), rng), "reencoded"),
        f"train/{w0}/{w0}_png.JPEG": (_png(base), "reencoded"),
        f"train/{w0}/{w0}_palette.JPEG": (_png(base.convert("P")), "reencoded"),
        f"train/{w0}/{w0}_rgba.JPEG": (_png(base.convert("RGBA")), "reencoded"),
        f"train/{w1}/{w1}_16bit.JPEG": (_png(sixteen), "reencoded"),
        f"train/{w1}/{w1}_exif_rotated.JPEG": (encode(base, rng, exif=exif), "reencoded"),
        f"train/{w1}/{w1}_progressive.JPEG": (encode(base, rng, progressive=True), "copied"),
        f"train/{w1}/{w1}_truncated.JPEG": (good[: len(good) * 6 // 10], "rejected"),
        f"train/{w1}/{w1}_empty.JPEG": (b"", "rejected"),
        f"train/{w1}/notes.txt": (b"not an image\n", "rejected"),
        "train/stray_file.JPEG": (good, "rejected"),  # outside any class directory: no label
        f"val/{w0}/ILSVRC2012_val_99999999.JPEG": (good[: len(good) // 2], "rejected"),
    }


def add_quirks(out: Path, wnids: list[str], seed: int) -> dict[str, str]:
    expected = {}
    for rel, (content, outcome) in quirky_files(wnids, seed).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(content)
        expected[rel] = outcome
    return expected


def make_sample(out: Path, classes: int = 10, per_class: int = 60, val_per_class: int = 10, seed: int = 0,
                quirks: bool = False, workers: int = 1, progress: bool = False) -> list[str]:
    wnids = choose_wnids(classes)
    jobs = plan_files(out, wnids, per_class, val_per_class, seed)
    for directory in {Path(j[0]).parent for j in jobs}:
        directory.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            _run(pool.imap_unordered(_make_one, jobs, chunksize=8), len(jobs), progress)
    else:
        _run(map(_make_one, jobs), len(jobs), progress)
    if quirks:
        add_quirks(out, wnids, seed)
    return wnids


def _run(results, total: int, progress: bool) -> None:
    if not progress:
        for _ in results:
            pass
        return
    from rich.progress import track
    for _ in track(results, total=total, description="generating"):
        pass
