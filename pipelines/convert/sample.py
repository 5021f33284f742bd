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
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .. import processes
from .imagenet_names import imagenet_1k

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "checker", "waves")
CANVAS = 768  # images are drawn at most this large, then resized: a 4,000-px image costs no more to draw
# The photo-like statistics (render): the spread of the luminance detail in 8-bit levels, which sets how many
# bytes a JPEG takes and how long it takes to decode (benchmarks/jpeg_stats.py measures both against a real
# photo; tests/test_sample_generator.py holds them to it); how much it varies over an image (focus); the spread
# of the colour noise; the 1/f tile the detail is cut from, and the octaves added to images larger than the canvas.
DETAIL = 11.0
FOCUS_SPREAD = 0.8
CHROMA = 6.0
# two colour-opponent directions (red against cyan, green against blue), each summing to 0: hue, not brightness
CHROMA_AXES = (np.array([1.0, -0.5, -0.5], np.float32), np.array([0.0, 0.87, -0.87], np.float32))
FRACTAL_TILE = 1024  # at least CANVAS: a canvas's detail is one window of it
# The detail's longest wavelength, in px. JPEG spends its bytes on the scales inside its 8 x 8 blocks; coarser
# detail would only add clutter at the scale of the shapes, which a model that sees the image at 32 px, or
# SimCLR telling images apart by their backgrounds, would learn instead of the classes.
DETAIL_LONGEST = 64
FRACTAL_SEED = 20120  # any fixed value: the tile is the same in every process and every run
GRAIN_OCTAVES = 2


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
    """The class's fill, w x h: a light and a dark shade of its hue in the class's pattern. The pattern is
    computed at half size (its periods are 6-14 px there) as a grey level and upsampled: half the cost."""
    a = _rgb(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    b = _rgb(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.5))
    hw, hh = (w + 1) // 2, (h + 1) // 2
    x, y = np.arange(hw, dtype=np.float32)[None, :], np.arange(hh, dtype=np.float32)[:, None]
    period = rng.uniform(6, 14) * max(hw, hh) / 256
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "solid":
        return Image.new("RGB", (w, h), a)
    if kind == "stripes":
        t = np.sin(2 * math.pi * u / period) > 0
    elif kind == "dots":
        t = (np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)) > 0.5
    elif kind == "checker":
        t = (np.floor(u / period) + np.floor(v / period)) % 2
    else:  # waves
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (u + 0.3 * period * np.sin(2 * math.pi * v / period)) / period)
    mix = Image.fromarray((t * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    return Image.composite(Image.new("RGB", (w, h), b), Image.new("RGB", (w, h), a), mix)


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


def _noise(w: int, h: int, rng: np.random.Generator, slope: float = 1.0, coarsest: int = 4) -> np.ndarray:
    """An h x w float32 field of zero mean and unit spread whose amplitude spectrum falls as 1/f^slope: photos
    fall about as 1/f (slope 1), smoother fields faster. Built coarse to fine, as an image pyramid is undone:
    white noise at each octave, from `coarsest` px up, added to the coarser field upsampled 2x (bilinear), each
    octave's amplitude 2^(octave x (slope - 1)). Two passes over the full size, about."""
    levels = max(0, int(math.log2(max(min(w, h), coarsest) / coarsest)))
    field, variance = None, 0.0
    for k in range(levels, -1, -1):
        sw, sh = -(-w >> k), -(-h >> k)
        amplitude = 2.0 ** (k * (slope - 1.0))
        variance += amplitude * amplitude
        white = (rng.random((sh, sw), dtype=np.float32) - np.float32(0.5)) * np.float32(amplitude * math.sqrt(12))
        field = white if field is None else \
            np.asarray(Image.fromarray(field).resize((sw, sh), Image.Resampling.BILINEAR)) + white
    return field * np.float32(1 / math.sqrt(variance))


def _scene(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The background's colours, smooth: a gradient between two muted colours (sky and ground), a third colour
    over fractal regions with sharp edges, and colour noise that is weaker and smoother than the luminance
    detail, as in photos. Computed at a quarter of the size and upsampled."""
    lw, lh = -(-w // 4), -(-h // 4)
    top, bottom, other = (np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.9)), np.float32)
                          for _ in range(3))
    ramp = np.linspace(0, 1, lh, dtype=np.float32)[:, None, None]
    base = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (lh, lw, 3))
    region = np.clip(_noise(lw, lh, rng, slope=1.5, coarsest=2) * 3 - np.float32(rng.uniform(-1, 1)), 0, 1)
    base = base + (other - base) * region[..., None]
    for axis in CHROMA_AXES:
        base += _noise(lw, lh, rng, slope=1.2, coarsest=2)[..., None] * (axis * np.float32(CHROMA))
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    return small.resize((w, h), Image.Resampling.BILINEAR)


@lru_cache(maxsize=1)
def _fractal_tiles() -> tuple[Image.Image, Image.Image]:
    """The luminance detail every image takes windows of: noise with a photo's 1/f amplitude spectrum at the
    wavelengths from 2 to DETAIL_LONGEST px, on a FRACTAL_TILE-px square, made by spectral synthesis (random
    phases under 1/f), which makes it periodic, so that copies join without seams. Returned 2 x 2 times as large,
    so that any window up to FRACTAL_TILE px lies inside: (all of it, as 8-bit grey centred on 128 with spread
    2 x DETAIL; its finest GRAIN_OCTAVES octaves alone, each half as strong, as RGB with the same grey in each
    channel). Made once per process from a fixed seed: each image takes windows at offsets of its own, far
    cheaper than new noise per image, and the tree stays deterministic."""
    n = FRACTAL_TILE
    rng = np.random.default_rng(FRACTAL_SEED)
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :])
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / np.maximum(f, 1 / n)
    spectrum[f < 1 / DETAIL_LONGEST] = 0
    full = np.fft.irfft2(spectrum, s=(n, n))
    scale = 2 * DETAIL / full.std()
    fine = np.fft.irfft2(np.where(f >= 0.5 ** (GRAIN_OCTAVES + 1), spectrum, 0), s=(n, n))
    tiles = []
    for field, spread in ((full, scale), (fine, scale / 2)):
        tile = Image.fromarray(np.clip(field * spread + 128, 0, 255).astype(np.uint8))
        doubled = Image.new("L", (2 * n, 2 * n))
        for x in (0, n):
            for y in (0, n):
                doubled.paste(tile, (x, y))
        tiles.append(doubled)
    return tiles[0], Image.merge("RGB", (tiles[1],) * 3)


def _detail(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The luminance detail of a w x h canvas (at most FRACTAL_TILE px), as an RGB image centred on grey 128, the
    same in R, G and B (photos' fine detail is mostly luminance): a window of the 1/f tile, its spread DETAIL x
    0.6-1.4 and varying over the image, some parts sharp and some soft, like focus and texture in a photo."""
    x, y = (int(v) for v in rng.integers(0, FRACTAL_TILE, 2))
    window = _fractal_tiles()[0].crop((x, y, x + w, y + h))
    lw, lh = -(-w // 4), -(-h // 4)
    focus = np.exp(_noise(lw, lh, rng, slope=2.0, coarsest=2) * np.float32(FOCUS_SPREAD))
    # the window's spread is 2 x DETAIL: the mask scales it down, to DETAIL x 0.6-1.4 x focus, at most to all of it
    keep = np.clip(focus * np.float32(rng.uniform(0.6, 1.4) / 2 * 255), 0, 255).astype(np.uint8)
    keep = Image.fromarray(keep).resize((w, h), Image.Resampling.BILINEAR)
    grey = Image.composite(window, Image.new("L", (w, h), 128), keep)
    return Image.merge("RGB", (grey, grey, grey))


def _grain(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Fine detail for an image upsampled from the canvas, which lacks the octaves finer than the canvas's: the
    finest GRAIN_OCTAVES octaves of the 1/f tile, repeated over the image from an offset of its own, as an RGB
    image centred on 128."""
    tile = _fractal_tiles()[1]
    x0, y0 = (int(v) for v in rng.integers(0, FRACTAL_TILE, 2))
    grain = Image.new("RGB", (w, h), None)  # not filled: the tiles cover it
    for y in range(-y0, h, 2 * FRACTAL_TILE):
        for x in range(-x0, w, 2 * FRACTAL_TILE):
            grain.paste(tile, (x, y))
    return grain


def render(c: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image of class c at `size`, drawn on a canvas of at most CANVAS px and resized to fit. A photo's
    statistics, so that its JPEG costs what a photo's does to store and decode: a background of smooth colours
    under 1/f luminance detail, and the class's textured shape under the same detail."""
    w, h = size
    scale = min(1.0, CANVAS / max(w, h))
    cw, ch = max(8, round(w * scale)), max(8, round(h * scale))
    shape, texture, hue = class_style(c)
    canvas = _scene(cw, ch, rng)
    canvas.paste(_texture(texture, cw, ch, hue, rng), (0, 0), _shape_mask(shape, cw, ch, rng))
    canvas = ImageChops.add(canvas, _detail(cw, ch, rng), 1.0, -128)
    if (cw, ch) == (w, h):
        return canvas
    if w <= cw:  # a tiny image, drawn at 8 px and up
        return canvas.resize((w, h), Image.Resampling.BICUBIC)
    return ImageChops.add(canvas.resize((w, h), Image.Resampling.BILINEAR), _grain(w, h, rng), 1.0, -128)


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
        with multiprocessing.Pool(workers, initializer=processes.tie_to_parent) as pool:  # they die with this process
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
