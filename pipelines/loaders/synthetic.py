"""The upper bound on speed: one preallocated batch on the device, yielded len() times per epoch.

It costs no decoding, no host-to-device copy and no allocation, so training with it measures the model alone.
Its length and classes follow the real split, so a run with it takes as many steps as with real data. Eval
batches differ from train batches (another seed): a model that memorized the train batch scores chance on them.
With views=2 it holds two different random batches, so a contrastive loss does not see two equal views.
With a resolution ramp it holds one batch per size of the ramp (made at build, so an epoch start costs nothing);
rand_augment is accepted and ignored: the batch stands for any pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..contract import NoOptions, Ramp, check_start_batch, parse_options, train_size
from .prelude import prelude


class SyntheticLoader:
    def __init__(self, *, batches: int, batch_size: int, image_size: int, num_classes: int,
                 device: torch.device, dtype: torch.dtype, seed: int, train: bool, views: int = 1,
                 ramp: Ramp | None = None):
        generator = torch.Generator().manual_seed(2 * seed + (0 if train else 1))
        sizes = ramp.distinct_sizes() if ramp else [image_size]
        self.images = {}
        for size in sizes:
            images = tuple(torch.randn(batch_size, 3, size, size, generator=generator)  # "normalized"
                           .to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                           for _ in range(views))
            self.images[size] = images[0] if views == 1 else images  # a tuple of views, as the contract says
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        self.labels = labels.to(device)
        self.batches, self.image_size, self.ramp = batches, image_size, ramp
        self.epoch = self.start_batch = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, check_start_batch(start_batch, self.batches)  # nothing to shuffle

    def __iter__(self):
        images = self.images[train_size(self.image_size, self.ramp, self.epoch)]
        for _ in range(self.start_batch, self.batches):
            yield images, self.labels


def parse(options: dict | None) -> NoOptions:
    """The synthetic loader has no options beyond `workers`: any key is a ValueError that says so."""
    return parse_options(NoOptions, "synthetic", options)


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1, rand_augment=None, ramp: Ramp | None = None) -> SyntheticLoader:
    p = prelude(data, split, parse=parse, options=options, reads=None, batch_size=batch_size, train=train, rank=rank,
                world_size=world_size, workers=workers)
    return SyntheticLoader(batches=p.batches, batch_size=batch_size, image_size=image_size,
                           num_classes=p.num_classes, device=torch.device(device), dtype=dtype, seed=seed, train=train,
                           views=views, ramp=ramp)
