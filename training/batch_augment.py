"""DeiT's batch augmentation on the device, after any loader: random erasing, then mixup or cutmix, with the
soft targets and the soft-target cross-entropy that go with them. timm's own classes do the work (RandomErasing,
Mixup; the loss is timm's SoftTargetCrossEntropy, in objectives.Supervised); this module runs
them on the loader's normalized batch.

Order, as DeiT's: erasing is per image (in DeiT it is the last of the per-image transforms, after
normalization: its noise is drawn in normalized units), mixup and cutmix then mix the batch with itself
reversed. Both run on the device with no host-device sync: their random draws are host-side Python and numpy
numbers (a mixing weight, a box, which images to erase) passed to kernels as arguments, and the noise is
`normal_()` on the device. Erasing is a Python loop over the batch (timm's): about a quarter of 64 images get
one small kernel each.

Seeding: timm draws from Python's `random`, numpy's global generator and torch's. The train loop reseeds all of
them before every step from (seed, rank, step) (training/randomness.py), so each rank draws its own batch
augmentation and a resumed run draws what an uninterrupted one draws there; this module draws and seeds nothing
itself.
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from .config import AugmentConfig, augmentations_on


class BatchAugment:
    """`__call__(images, labels) -> (images, targets)`: targets are soft (B x classes) when mixing is on, else
    the labels. Built by build_objective only when `enabled(config)`: at least one of erasing, mixup and cutmix
    is on."""

    def __init__(self, config: AugmentConfig, *, num_classes: int, label_smoothing: float):
        self.erasing = RandomErasing(config.erasing, mode="pixel", device="cpu") if config.erasing else None
        self.mixup = None
        if config.mixup or config.cutmix:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mix_prob,
                               switch_prob=config.switch_prob, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    @property
    def soft_targets(self) -> bool:
        return self.mixup is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.clone()  # the loader's batch stays as it was handed over (timm's ops work in place)
        if self.erasing is not None:
            self.erasing.device = images.device  # where its noise is drawn
            self.erasing(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels


def enabled(config: AugmentConfig) -> bool:
    """Whether `config` turns on an augmentation of the batch (build_objective builds a BatchAugment only then)."""
    return bool(augmentations_on(config, batch_only=True))

