"""The contract every loader honours, so that nothing outside `pipelines/` asks which kind it got.

`build_loader(...)` returns an object with
- `__iter__` yielding `(images, labels)`: images B x 3 x H x W on `device`, channels_last, normalized with the
  ImageNet mean and std, in `dtype`; labels int64 on `device`;
- `__len__`: batches per epoch (per rank);
- `set_epoch(epoch, start_batch=0)`: the next iteration yields batches `start_batch`, `start_batch + 1`, ...
  of `epoch`: the same samples in the same order (and, where the loader is seeded, the same pixels) that an
  uninterrupted epoch yields from there. They are found by seeking, not by reading the batches before them, so a
  run resumed at 90 % of an ImageNet epoch starts as fast as one at its start. `len()` stays the full epoch.
  Iterating again without a new `set_epoch` repeats that epoch from `start_batch`.
- No host-device sync per batch: constants live on the device, made once; counters stay on the device.

Train: random-resized-crop with torchvision's ranges, then a horizontal flip with p = 0.5; with `rand_augment`
(a RandAugment, timm's "rand-m9-mstd0.5-inc1"), RandAugment per sample on the uint8 pixels of the crop, before
normalization (after the flip, as timm; dali applies it before its flip, which only swaps the sign of a geometric
operation, drawn as often either way). With `ramp` (progressive resolution), the batches of epoch e are ramp.size(e) px square; an
epoch's first batch at a new size costs no more than any other (no pipeline rebuilt at the epoch start).
Eval: resize the shorter side to image_size / 0.875, then center-crop; every sample once per epoch across ranks.

Two views (`views=2`, train only), for self-supervised pre-training (SimCLR, MoCo v3): iterating yields
`(views, labels)`, where `views` is a tuple of 2 image tensors, each one under the image contract above, that
are two independently augmented views of the same B samples, in the order of `labels`. Each view gets the
SimCLR augmentation (TWO_VIEWS below): random-resized-crop, flip, colour jitter (p = 0.8),
grayscale (p = 0.2), Gaussian blur (p = 0.5), then normalization. `len()`, `set_epoch`, the ranks' shares and
the per-(seed, epoch) reproducibility are those of `views=1`. `views=1` yields `(images, labels)` as above;
any other count, or `views=2` with train=False, is a ValueError (check_views).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Mapping, Protocol, TypeVar

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875  # eval resizes the shorter side to image_size / 0.875 (256 for 224), then crops


@dataclasses.dataclass(frozen=True)
class TwoViewAugment:
    """The two-view augmentation: SimCLR's (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
    Visual Representations", appendix A) with MoCo v3's colour-jitter strengths (Chen et al. 2021, "An Empirical
    Study of Training Self-Supervised Vision Transformers"; SimCLR's are 0.8, 0.8, 0.8, 0.2). The crop is
    CROP_SCALE and CROP_RATIO, as in supervised training. Every loader reads the one instance, TWO_VIEWS."""
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # the four strengths in torchvision's ColorJitter units
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # turns of the hue circle (0.1 = 36 degrees)
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels, drawn uniformly per view


TWO_VIEWS = TwoViewAugment()
VIEWS = (1, 2)


# RandAugment as DeiT trains with it (Touvron et al. 2021, "Training data-efficient image transformers"), in timm's
# notation "rand-m9-mstd0.5-inc1": 2 operations per image, each drawn per sample (with replacement) from timm's
# increasing-severity set and applied with p 0.5, at a magnitude drawn per operation from N(9, 0.5) clipped to
# [0, 10], with a random sign for the signed ones (timm/data/auto_augment.py, rand_augment_transform).
RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
RAND_AUGMENT_P = 0.5  # timm's per-operation probability
RAND_AUGMENT_MAX = 10.0  # timm's magnitude scale: magnitude / 10 of each operation's range
RAND_AUGMENT_FILL = (124, 116, 104)  # what geometric operations fill with: timm's img_mean (ImageNet's, 0-255)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """The RandAugment a train loader applies per sample, after the crop and flip, before normalization."""
    ops: int = 2  # operations per image
    magnitude: float = 9.0  # of RAND_AUGMENT_MAX
    std: float = 0.5  # of the per-operation magnitude; 0: always `magnitude`

    @classmethod
    def parse(cls, text: str) -> "RandAugment | None":
        """timm's config string ("rand-m9-mstd0.5-inc1", "rand-n3-m7") -> RandAugment; "" -> None (off).
        Only timm's increasing set is offered (inc1, DeiT's); "inc0" is refused rather than silently replaced."""
        if not text:
            return None
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"rand_augment '{text}': expected timm's form 'rand-m9-mstd0.5-inc1'")
        values = {}
        for part in parts[1:]:
            key = next((k for k in ("mstd", "inc", "n", "m") if part.startswith(k)), None)
            try:
                values[key] = float(part[len(key):]) if key else None
            except ValueError:
                key = None
            if key is None:
                raise ValueError(f"rand_augment '{text}': cannot read '{part}' (known: n<ops>, m<magnitude>, "
                                 "mstd<std>, inc1)")
        if values.get("inc", 1) != 1:
            raise ValueError(f"rand_augment '{text}': only timm's increasing operation set (inc1) is implemented")
        spec = cls(ops=int(values.get("n", 2)), magnitude=values.get("m", 9.0), std=values.get("mstd", 0.5))
        if spec.ops < 1 or not 0 <= spec.magnitude <= RAND_AUGMENT_MAX or spec.std < 0:
            raise ValueError(f"rand_augment '{text}': needs n >= 1, 0 <= m <= 10 and mstd >= 0")
        return spec


@dataclasses.dataclass(frozen=True)
class Ramp:
    """Progressive resolution, as ffcv-imagenet trains: epochs up to start_epoch at start_size, then a linear
    ramp rounded to multiples of `step`, reaching end_size at end_epoch and staying there."""
    start_size: int
    end_size: int
    start_epoch: int
    end_epoch: int
    step: int = 32

    def size(self, epoch: int) -> int:
        if epoch <= self.start_epoch:
            return self.start_size
        if epoch >= self.end_epoch:
            return self.end_size
        share = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return int(round((self.start_size + share * (self.end_size - self.start_size)) / self.step)) * self.step

    def sizes(self, epochs: int) -> list[int]:
        return [self.size(epoch) for epoch in range(epochs)]

    def distinct_sizes(self) -> list[int]:
        """Every size the ramp trains at, smallest first (torch.compile builds one graph for each)."""
        return sorted(set(self.sizes(self.end_epoch + 1)))


def train_size(image_size: int, ramp: Ramp | None, epoch: int) -> int:
    """The side of epoch `epoch`'s train batches: the ramp's size, or image_size without one."""
    return image_size if ramp is None else ramp.size(epoch)


class Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


class LoaderUnavailable(ImportError):
    """A loader kind whose library is not installed; the message names the pip extra that installs it."""


def require(module: str, kind: str, extra: str):
    """Imports `module` for loader `kind`, or raises LoaderUnavailable naming the extra to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LoaderUnavailable(f"the '{kind}' loader needs {module}, which is not importable ({e}); "
                                f"install it with: pip install -e '.[{extra}]'") from None


Options = TypeVar("Options")


def parse_options(cls: type[Options], kind: str, options: Mapping[str, Any] | None) -> Options:
    """A loader's speed knobs (a dataclass) from a plain mapping: an unknown key or a wrong type is an error
    that names it and lists the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (options or {}).items():
        if key not in fields:
            known = f"known: {', '.join(fields)}" if fields else "it has none (data.options must be empty)"
            raise ValueError(f"unknown option '{key}' for the '{kind}' loader; {known}")
        default = fields[key].default
        accepted = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, accepted):
            raise ValueError(f"option '{key}' of the '{kind}' loader must be {type(default).__name__}, "
                             f"got {value!r}")
        values[key] = type(default)(value)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a loader that has no speed knobs beyond `workers`."""


def default_workers(world_size: int) -> int:
    """CPU threads or processes per rank: the cores this process may use, shared by the ranks on this node
    (torchrun sets LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, cores // max(1, local))


def batches_per_epoch(samples: int, batch_size: int, train: bool) -> int:
    """Train drops the last partial batch (every rank steps in lockstep); eval keeps it (every sample counts)."""
    return samples // batch_size if train else -(-samples // batch_size)


def eval_resize(image_size: int) -> int:
    return round(image_size / EVAL_CROP_FRACTION)


def check_views(views: int, train: bool) -> None:
    if views not in VIEWS:
        raise ValueError(f"views must be 1 (supervised) or 2 (two augmented views for self-supervised "
                         f"pre-training), got {views!r}")
    if views == 2 and not train:
        raise ValueError("views=2 is for training (train=True): eval reads one center crop per sample")


def blur_kernel_size(image_size: int) -> int:
    """SimCLR blurs with a kernel 10 % of the image side, odd so that it has a center: 23 for 224 px."""
    return int(0.1 * image_size) // 2 * 2 + 1


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) B x 3 x H x W (on the device already) -> normalized `dtype`, channels_last.
    Done on the device: the host copies a quarter of the bytes (uint8, not float32).

    (x - mean) / std as one multiply-add, x * scale + bias, computed in float32 and rounded once to `dtype`,
    written straight into a new channels_last tensor: on a GPU one kernel, whatever the input's layout (FFCV's
    channels_last, torchvision's NCHW). The constants are made once per device (normalize_constants); a
    `torch.tensor(..., device=cuda)` per batch would copy from pageable host memory and wait for the GPU."""
    scale, bias = normalize_constants(images.device, images.dtype == torch.uint8)
    out = torch.empty(images.shape, dtype=dtype, device=images.device, memory_format=torch.channels_last)
    return torch.addcmul(bias, images, scale, out=out)


@functools.lru_cache(maxsize=None)
def normalize_constants(device: torch.device, uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's per-channel (scale, bias), 1 x 3 x 1 x 1 float32 on `device`: scale = 1 / (255 std) for
    uint8 input, 1 / std for float input in [0, 1]; bias = -mean / std. Derived in float64, rounded once."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    scale = 1 / (std * (255 if uint8 else 1))
    return tuple(t.to(torch.float32).view(1, 3, 1, 1).to(device) for t in (scale, -mean / std))


def check_start_batch(start_batch: int, batches: int) -> int:
    """set_epoch's start_batch must fall inside the epoch (the end itself is allowed: an empty iteration)."""
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {batches} batches")
    return start_batch


def rank_indices(n: int, *, rank: int, world_size: int, train: bool, seed: int, epoch: int) -> np.ndarray:
    """The sample indices rank `rank` reads in `epoch`.
    Train: one permutation per (seed, epoch), cut into equal parts (the remainder is dropped, so every rank
    runs the same number of steps). Eval: sample i goes to rank i % world_size, in order: every sample is
    read exactly once across ranks, none twice."""
    if not train:
        return np.arange(rank, n, world_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def rank_samples(n: int, *, rank: int, world_size: int, train: bool) -> int:
    """len(rank_indices(...)) without drawing the permutation, which takes 0.2-0.45 s for ImageNet's 1.15 M train
    samples (2 cores shared at a load of 4)."""
    return n // world_size if train else len(range(rank, n, world_size))


def check_batch(images: torch.Tensor, labels: torch.Tensor, *, image_size: int, device: torch.device,
                dtype: torch.dtype, num_classes: int) -> None:
    """Raises AssertionError saying which part of the contract a batch breaks (used by the tests)."""
    assert images.dim() == 4 and images.shape[1:] == (3, image_size, image_size), f"shape {tuple(images.shape)}"
    assert images.device.type == torch.device(device).type, f"images on {images.device}, expected {device}"
    assert images.dtype == dtype, f"images are {images.dtype}, expected {dtype}"
    assert images.is_contiguous(memory_format=torch.channels_last), "images are not channels_last"
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],), f"labels {labels.dtype} {labels.shape}"
    assert labels.device.type == images.device.type, "labels and images on different devices"
    assert int(labels.min()) >= 0 and int(labels.max()) < num_classes, "label out of range"
    mean = images.float().mean(dim=(0, 2, 3))
    assert mean.abs().max() < 2.5, f"channel means {mean.tolist()}: not normalized?"


def check_views_batch(views, labels: torch.Tensor, **contract) -> None:
    """check_batch for a two-view batch: a tuple of 2 image tensors, each under the contract, one label each."""
    assert isinstance(views, tuple) and len(views) == 2, f"expected a tuple of 2 views, got {type(views).__name__}"
    for images in views:
        check_batch(images, labels, **contract)
