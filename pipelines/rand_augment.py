"""RandAugment per sample, in torch, on the uint8 batch on its device: timm's "rand-m9-mstd0.5-inc1" (DeiT's).

The ffcv and torchvision loaders call `rand_augment` between the host-to-device copy and contract.normalize, with
a generator from `batch_generator`, so that a batch's draws depend only on (seed, epoch, rank, batch): a resumed
run seeks to the same pixels.

Per sample, with no host-device sync. `draw` makes every random number of a call with two calls on the batch's
device (torch.rand, torch.randn): per layer and image, the operation (uniform over RAND_AUGMENT_OPS, with
replacement across layers), whether it runs (p = RAND_AUGMENT_P), its magnitude (N(m, std) clipped to [0, 10])
and its sign. No drawn value decides what runs: each layer computes every operation for the whole batch, with
per-image arguments that are the identity where an image did not draw it (8 bits, threshold 256, add 0, factor 1,
the identity affine, flags off). The price is that work, some 35 batch-sized float32 passes per layer: 1.1 s
per batch of 64 at 224 px (2 layers) on the 2 cores of the development machine when idle (median of 5 runs; 3-5 s
while other jobs share the cores), the geometric sampler about half of it. On a GPU the passes are memory-bound;
not measured on one yet.

Each operation does Pillow's arithmetic (timm's backend), so that an image's result equals timm's; the tests check
each against timm's own functions:
- AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd: one 256-entry table per image and channel
  (AutoContrast and Equalize built from one histogram), applied with one gather;
- Color, Contrast, Brightness, Sharpness: Image.blend with the degenerate image (Pillow's fixed-point grayscale;
  its rounded mean; black; the SMOOTH 3x3 filter, borders kept), truncated as Pillow truncates;
- Rotate, ShearX/Y, TranslateX/Y: one 2x3 affine per image (Pillow's: output pixel centre -> input point),
  sampled bilinearly as Pillow's transform samples (edges clamped, points outside the image take
  RAND_AUGMENT_FILL, truncated). This sampler, not grid_sample: grid_sample's normalized coordinates round-trip
  through 2 / 224 (not a float), so even the identity moves values (by up to 0.008 at 224 px), and truncation
  then puts 30 % of the pixels one level low; and affine_grid is a matmul, which runs in TF32 where allowed.

Where it differs from timm:
- bilinear only; timm draws bilinear or bicubic per operation (DeiT passes bicubic): bicubic needs 16 taps;
- sampling in float32 (Pillow: float64): up to 1.7 % of a transformed image's pixels one level apart, none more;
- Posterize at magnitude 10 keeps 0 bits: black (Pillow's mask for 0 bits). timm hands Pillow 0 bits there, which
  Pillow 13 refuses (ValueError): with mstd 0.5, 2.3 % of timm's Posterize applications clip to 10 and raise;
- the random numbers come from torch's generator, not Python's `random`: the same distributions, other streams.

Magnitude 0 (std 0) is the identity for the magnitude-driven operations, IDENTITY_AT_ZERO: all but AutoContrast,
Equalize and Invert (no magnitude) and Posterize (timm's PosterizeIncreasing keeps 4 bits at magnitude 0, which
changes pixels). `op_set=` restricts the operations drawn from, for that test and for comparisons with DALI.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .contract import RAND_AUGMENT_FILL, RAND_AUGMENT_MAX, RAND_AUGMENT_OPS, RAND_AUGMENT_P, RandAugment

OPS = {name: index for index, name in enumerate(RAND_AUGMENT_OPS)}
NONE = -1  # the operation index of an image whose layer did not run
IDENTITY_AT_ZERO = tuple(name for name in RAND_AUGMENT_OPS
                         if name not in ("AutoContrast", "Equalize", "Invert", "Posterize"))


class Draws(NamedTuple):
    """A call's random numbers, each layers x B on the batch's device."""
    op: torch.Tensor  # int64 index into RAND_AUGMENT_OPS
    applied: torch.Tensor  # bool, p = RAND_AUGMENT_P
    magnitude: torch.Tensor  # float32 in [0, RAND_AUGMENT_MAX]
    sign: torch.Tensor  # float32, -1 or 1 with p 0.5 each (used by the signed operations)


def rand_augment(images: torch.Tensor, spec: RandAugment, generator: torch.Generator, *,
                 op_set: Sequence[str] = RAND_AUGMENT_OPS) -> torch.Tensor:
    """uint8 B x 3 x H x W on any device (NCHW or channels_last) -> uint8 B x 3 x H x W on the same device,
    channels_last. Float32 inside (integers in 0-255), quantized after every layer as Pillow is after every op."""
    draws = draw(spec, images.shape[0], generator, images.device, op_set)
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    for layer in range(spec.ops):
        op = torch.where(draws.applied[layer], draws.op[layer], NONE)
        x = apply_layer(x, op, draws.magnitude[layer], draws.sign[layer])
    return x.to(torch.uint8, memory_format=torch.channels_last)


def batch_generator(device: torch.device, seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, epoch, rank, batch) alone, so that a batch's draws depend only
    on its position. The seed is mixed on the host (SeedSequence); seeding a CUDA generator does not sync."""
    state = np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def draw(spec: RandAugment, batch: int, generator: torch.Generator, device: torch.device,
         op_set: Sequence[str] = RAND_AUGMENT_OPS) -> Draws:
    """All of a call's random numbers (see Draws), from two calls on `device`; the op uniform over `op_set`."""
    uniform = torch.rand(3, spec.ops, batch, generator=generator, device=device)
    normal = torch.randn(spec.ops, batch, generator=generator, device=device)
    choice = (uniform[0] * len(op_set)).long().clamp_(max=len(op_set) - 1)
    op = op_indices(tuple(op_set), torch.device(device))[choice]
    magnitude = (spec.magnitude + spec.std * normal).clamp_(0, RAND_AUGMENT_MAX)
    return Draws(op, uniform[1] < RAND_AUGMENT_P, magnitude, torch.where(uniform[2] < 0.5, -1.0, 1.0))


def apply_layer(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One layer: float32 B x 3 x H x W (integers, NCHW) -> the same, image i changed by operation op[i]
    (NONE: unchanged) at magnitude[i] with sign[i]. Only one operation acts on an image, so the order of the three
    kinds below does not matter."""
    is_op = {name: op == index for name, index in OPS.items()}
    level = magnitude.double() / RAND_AUGMENT_MAX  # timm's *_level_to_arg, in float64 as Python computes them
    signed = sign.double() * level
    x = apply_tables(x, is_op, level)
    x = apply_blend(x, is_op, signed)
    return apply_affine(x, affine(is_op, signed, x.shape[-2], x.shape[-1]))


def apply_tables(x: torch.Tensor, is_op: dict, level: torch.Tensor) -> torch.Tensor:
    """AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd: each an identity table where not drawn."""
    batch, channels, height, width = x.shape
    index = x.reshape(batch, channels, height * width).long()
    histogram = torch.zeros(batch, channels, 256, dtype=torch.int64, device=x.device)
    histogram.scatter_add_(2, index, torch.ones(1, 1, 1, dtype=torch.int64, device=x.device).expand_as(index))
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    per_image = functools.partial(per_image_value, shape=(batch, 1, 1))
    bits = per_image(is_op["Posterize"], 4 - torch.trunc(level * 4), 8)  # PosterizeIncreasing; 8: identity
    threshold = per_image(is_op["Solarize"], 256 - torch.trunc(level * 256).clamp(max=256), 256)
    add = per_image(is_op["SolarizeAdd"], torch.trunc(level * 110).clamp(max=128), 0)
    step = torch.exp2(8 - bits)  # Pillow keeps the top `bits` bits: i & ~(2 ** (8 - bits) - 1)
    table = torch.floor(levels / step) * step
    table = torch.where(table >= threshold, 255 - table, table)
    table = torch.where(table < 128, table + add, table)  # Pillow's min(255, i + add): never above 237
    table = torch.where(is_op["Invert"].view(-1, 1, 1), 255 - table, table)
    table = torch.where(is_op["AutoContrast"].view(-1, 1, 1), auto_contrast_table(histogram, levels), table)
    table = torch.where(is_op["Equalize"].view(-1, 1, 1), equalize_table(histogram, levels), table)
    table = table.to(torch.float32).expand(batch, channels, 256)
    return table.gather(2, index).view(batch, channels, height, width)


def auto_contrast_table(histogram: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: per channel, lo..hi stretched to 0..255 as int(i * scale + offset), in float64 as
    Pillow computes it; a channel with one level is left alone."""
    present = histogram > 0
    low = torch.where(present, levels, 256.0).amin(-1, keepdim=True)
    high = torch.where(present, levels, -1.0).amax(-1, keepdim=True)
    scale = 255.0 / (high - low).clamp(min=1)
    stretched = torch.trunc(levels * scale + -low * scale).clamp(0, 255)
    return torch.where(high > low, stretched, levels)


def equalize_table(histogram: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: step = (pixels - count of the last used level) // 255, table[i] = (step // 2 + pixels
    below i) // step, identity where step is 0. Pillow clips entries above 255 (small images) to 255."""
    last = torch.where(histogram > 0, levels.long(), -1).amax(-1, keepdim=True)
    step = (histogram.sum(-1, keepdim=True) - histogram.gather(-1, last)) // 255
    below = histogram.cumsum(-1) - histogram
    table = ((below + step // 2) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, table.double(), levels)


def apply_blend(x: torch.Tensor, is_op: dict, signed: torch.Tensor) -> torch.Tensor:
    """Color, Contrast, Brightness, Sharpness: Pillow's ImageEnhance, blend(degenerate, image, factor) =
    truncate(d + factor * (x - d)) in float32 as Pillow's C does; factor 1 (not drawn) gives x exactly."""
    enhance = is_op["Color"] | is_op["Contrast"] | is_op["Brightness"] | is_op["Sharpness"]
    factor = per_image_value(enhance, (1 + signed * 0.9).clamp(min=0.1), 1, (-1, 1, 1, 1)).float()
    # Pillow's L: (19595 R + 38470 G + 7471 B + 2^15) >> 16; every partial sum < 2^24, so float32 is exact. In-place
    # steps after one allocation each: on the CPU a fresh batch-sized tensor costs ~5x a pass (page faults).
    gray = (x[:, 0:1] * 19595).add_(x[:, 1:2], alpha=38470).add_(x[:, 2:3], alpha=7471).add_(32768)
    gray.div_(65536).floor_()
    mean = torch.floor(gray.sum((2, 3), keepdim=True, dtype=torch.float64) / gray[0].numel() + 0.5).float()
    # SMOOTH: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded, border pixels kept. Sums of slices, not a conv:
    # cuDNN may run a conv in TF32, which cannot hold 13 * 255 exactly. No sum sits at a rounding tie (13 is odd).
    rows = (x[..., :-2, :] + x[..., 1:-1, :]).add_(x[..., 2:, :])
    total = (rows[..., :-2] + rows[..., 1:-1]).add_(rows[..., 2:]).add_(x[..., 1:-1, 1:-1], alpha=4)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = total.add_(6.5).div_(13).floor_()
    mean_or_black = torch.where(is_op["Contrast"], mean.view(-1), 0.0).view(-1, 1, 1, 1)  # Brightness: black
    other = torch.where(is_op["Color"].view(-1, 1, 1, 1), gray, mean_or_black)
    degenerate = torch.where(is_op["Sharpness"].view(-1, 1, 1, 1), smooth, other)
    return (x - degenerate).mul_(factor).add_(degenerate).floor_().clamp_(0, 255)


def affine(is_op: dict, signed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rotate, ShearX/Y, TranslateX/Y as Pillow's affine data (a0..a5: output (x, y) -> input (a0 x + a1 y + a2,
    a3 x + a4 y + a5)), B x 6 float64; the identity where none was drawn. Rotate turns about the centre (Pillow's
    Image.rotate, degrees counter-clockwise), shears are about the top-left corner, translations are of the side."""
    zero = torch.zeros_like(signed)
    angle = -torch.deg2rad(torch.where(is_op["Rotate"], signed * 30, zero))
    cos, sin = angle.cos(), angle.sin()
    shear, shift = signed * 0.3, signed * 0.45
    cx, cy = width / 2, height / 2
    return torch.stack([
        cos, sin + torch.where(is_op["ShearX"], shear, zero),
        cx - cos * cx - sin * cy + torch.where(is_op["TranslateX"], shift * width, zero),
        -sin + torch.where(is_op["ShearY"], shear, zero), cos,
        cy + sin * cx - cos * cy + torch.where(is_op["TranslateY"], shift * height, zero)], dim=1)


def apply_affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Pillow's bilinear transform (Geometry.c): sample at a0 (x + 0.5) + a1 (y + 0.5) + a2, ...; a point outside
    [0, W) x [0, H) takes the fill; inside, the 4 nearest pixels, indices clamped to the image (here: read from
    the image padded by its edge pixels), truncated. The identity gives every pixel back exactly (weight 0)."""
    batch, channels, height, width = x.shape
    a = matrix.to(torch.float32).view(batch, 6, 1, 1).unbind(1)
    u = torch.arange(width, dtype=torch.float32, device=x.device) + 0.5
    v = (torch.arange(height, dtype=torch.float32, device=x.device) + 0.5).view(height, 1)
    sx = (a[0] * u + a[1] * v).add_(a[2])  # B x H x W, in Pillow's order of operations
    sy = (a[3] * u + a[4] * v).add_(a[5])
    inside = ((sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)).unsqueeze(1)
    x0 = sx.sub_(0.5).floor().clamp_(-1, width - 1)  # inside the image it is so already
    y0 = sy.sub_(0.5).floor().clamp_(-1, height - 1)
    dx, dy = sx.sub_(x0).unsqueeze(1), sy.sub_(y0).unsqueeze(1)
    side = width + 2
    corner = y0.add_(1).mul_(side).add_(x0).add_(1).long().view(batch, 1, -1).expand(batch, channels, -1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate").view(batch, channels, -1)

    def pixels(offset: int) -> torch.Tensor:  # a shifted view, so that one index serves the 4 corners
        return padded[..., offset:].gather(2, corner).view(batch, channels, height, width)

    top = pixels(0).lerp_(pixels(1), dx)  # in float32, where Pillow interpolates in float64
    bottom = pixels(side).lerp_(pixels(side + 1), dx)
    return torch.where(inside, top.lerp_(bottom, dy).floor_(), fill(x.device))


def per_image_value(drawn: torch.Tensor, value: torch.Tensor, identity: float, shape) -> torch.Tensor:
    """value where the image drew the operation, else the operation's identity argument, shaped to broadcast."""
    return torch.where(drawn, value, identity).view(shape)


@functools.lru_cache(maxsize=None)
def fill(device: torch.device) -> torch.Tensor:
    """RAND_AUGMENT_FILL as 1 x 3 x 1 x 1 float32 on `device`, made once (a per-call torch.tensor would sync)."""
    return torch.tensor(RAND_AUGMENT_FILL, dtype=torch.float32).view(1, 3, 1, 1).to(device)


@functools.lru_cache(maxsize=None)
def op_indices(op_set: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """The RAND_AUGMENT_OPS indices of `op_set`, int64 on `device`, made once per set and device."""
    unknown = [name for name in op_set if name not in OPS]
    if unknown or not op_set:
        raise ValueError(f"op_set {op_set}: unknown {unknown}; known: {', '.join(RAND_AUGMENT_OPS)}")
    return torch.tensor([OPS[name] for name in op_set], dtype=torch.int64).to(device)
