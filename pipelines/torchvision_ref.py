"""The baseline a user would write without this project: a torch DataLoader over the same stored JPEGs,
decoded with PIL (libjpeg-turbo) on the CPU and augmented with `transforms.v2`, pinned memory and
non-blocking copies. It is the reference for correctness and for speed. (`torchvision.io.decode_jpeg` would
do the same, but it is deprecated since torchvision 0.29.)

It reads the converter's webdataset shards by their index (one pread per sample), so it sees exactly the
images the DALI and FFCV loaders see. Augmentation runs on PIL images in the workers; the batch crosses to
the device as uint8 (a quarter of the float32 bytes) and is normalized there. With views=2 a worker runs the
SimCLR transform (`ssl_transform`) twice per sample, so the two views are independent draws of one RNG stream.
"""
from __future__ import annotations

import gc
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from .contract import (CROP_RATIO, CROP_SCALE, SSL_BLUR_P, SSL_BLUR_SIGMA, SSL_BRIGHTNESS, SSL_CONTRAST,
                       SSL_FLIP_P, SSL_GRAY_P, SSL_HUE, SSL_JITTER_P, SSL_SATURATION, NoOptions, blur_kernel_size,
                       default_workers, eval_resize, normalize, parse_options, rank_indices)
from .formats.manifest import RECONVERT, DatasetError, check_files, dali_shards, load_manifest
from .formats.webdataset import ShardReader


class ShardDataset(Dataset):
    """Sample i of epoch e, augmented with torch's RNG seeded from (seed, e, i): the same crop and flip
    whichever worker reads it, however many workers there are, and after a resume. views=2: a tuple of two
    augmented copies, drawn one after the other from that RNG (reproducible, and different from each other)."""

    def __init__(self, shards: list[tuple[Path, Path]], transform, seed: int, split: str, views: int = 1):
        self.reader = ShardReader(shards)
        self.transform, self.seed, self.split, self.views = transform, seed, split, views

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = item
        try:
            jpeg, label = self.reader.read(i)
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError) as e:
            raise DatasetError(f"split '{self.split}', {self.reader.where(i)}: {e}; {RECONVERT}") from None
        # fork_rng: with workers=0 this runs in the trainer's process, whose RNG must not move (~10 us)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
            if self.views == 1:
                return self.transform(image), label
            return tuple(self.transform(image) for _ in range(self.views)), label


class EpochSampler(Sampler):
    """This rank's (index, epoch) pairs for the current epoch (contract.rank_indices)."""

    def __init__(self, n: int, *, rank: int, world_size: int, train: bool, seed: int):
        self.n, self.rank, self.world_size, self.train, self.seed, self.epoch = n, rank, world_size, train, seed, 0

    def indices(self) -> np.ndarray:
        return rank_indices(self.n, rank=self.rank, world_size=self.world_size, train=self.train, seed=self.seed,
                            epoch=self.epoch)

    def __iter__(self):
        return ((i, self.epoch) for i in self.indices().tolist())

    def __len__(self) -> int:
        return len(self.indices())


class TorchvisionLoader:
    def __init__(self, dataset: ShardDataset, sampler: EpochSampler, *, batch_size: int, train: bool,
                 device: torch.device, dtype: torch.dtype, workers: int, seed: int):
        self.sampler, self.device, self.dtype, self.started = sampler, device, dtype, False
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", drop_last=train,
                                 persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self):
        if self.loader.num_workers and not self.started:
            # The workers fork here. A DALI pipeline left for the garbage collector in this process would be
            # destroyed in a worker, where its destructor blocks forever: collect it before forking.
            gc.collect()
            self.started = True
        for images, labels in self.loader:
            labels = labels.to(self.device, non_blocking=True)
            if isinstance(images, torch.Tensor):
                yield normalize(images.to(self.device, non_blocking=True), self.dtype), labels
            else:  # views=2: collated into a sequence of batches, one per view
                yield tuple(normalize(view.to(self.device, non_blocking=True), self.dtype) for view in images), labels


def transforms(image_size: int, train: bool) -> v2.Transform:
    """PIL image -> uint8 3 x size x size tensor. The geometry runs on the PIL image, before the tensor."""
    if train:
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
                           v2.RandomHorizontalFlip(0.5), v2.PILToTensor()])
    return v2.Compose([v2.Resize(eval_resize(image_size), antialias=True), v2.CenterCrop(image_size),
                       v2.PILToTensor()])


def ssl_transform(image_size: int) -> v2.Transform:
    """One SimCLR view (contract.SSL_*): PIL image -> uint8 3 x size x size tensor. The colour ops run on the
    PIL image (ColorJitter takes 1.9 ms on a 128-px PIL image, 3.3 ms on its tensor, one thread); the blur on
    the tensor (on a PIL image torchvision converts to a tensor and back). The blur is the costly step:
    ~5 ms at 128 px, a 2-D convolution with a kernel 10 % of the side."""
    size = blur_kernel_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
        v2.RandomHorizontalFlip(SSL_FLIP_P),
        v2.RandomApply([v2.ColorJitter(SSL_BRIGHTNESS, SSL_CONTRAST, SSL_SATURATION, SSL_HUE)], p=SSL_JITTER_P),
        v2.RandomGrayscale(SSL_GRAY_P),
        v2.PILToTensor(),
        v2.RandomApply([v2.GaussianBlur(size, sigma=SSL_BLUR_SIGMA)], p=SSL_BLUR_P)])


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1) -> TorchvisionLoader:
    parse_options(NoOptions, "torchvision", options)
    manifest = load_manifest(data)
    shards = dali_shards(data, manifest, split)
    check_files(data, manifest, [path for pair in shards for path in pair])
    try:
        transform = transforms(image_size, train) if views == 1 else ssl_transform(image_size)
        dataset = ShardDataset(shards, transform, seed, split, views)
    except ValueError as e:  # an index that does not parse
        raise DatasetError(f"{e}; {RECONVERT}") from None
    sampler = EpochSampler(len(dataset), rank=rank, world_size=world_size, train=train, seed=seed)
    workers = default_workers(world_size) if workers is None else workers
    return TorchvisionLoader(dataset, sampler, batch_size=batch_size, train=train, device=torch.device(device),
                             dtype=dtype, workers=workers, seed=seed)
