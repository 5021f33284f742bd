"""Supervised training: cross-entropy on the labels, with DeiT's augmentation of the batch when it is on."""
from __future__ import annotations

import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from .. import batch_augment
from ..config import Config, ConfigError
from ..model import create_model
from .base import Objective


class Supervised(Objective):
    """Cross-entropy on the labels; with a BatchAugment (training/batch_augment.py: random erasing, mixup,
    cutmix) the batch is augmented on the device first, and mixing makes the targets soft. The network is the
    timm model with the dataset's classes; evaluation is top-1/top-5 on each eval split."""
    name, supervised, batch_augment, best_metric = "supervised", True, True, "top1"

    def __init__(self, label_smoothing: float = 0.0, augment=None):
        self.label_smoothing, self.augment = label_smoothing, augment
        # timm's SoftTargetCrossEntropy for mixup's soft targets (they already hold the label smoothing)
        self.soft = SoftTargetCrossEntropy() if augment is not None and augment.soft_targets else None

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> "Supervised":
        augment = None
        if batch_augment.enabled(config.augment):
            if (config.augment.mixup or config.augment.cutmix) and num_classes < 2:
                raise ConfigError("augment.mixup and augment.cutmix need the dataset's classes for their targets "
                                  f"(got {num_classes})")
            augment = batch_augment.BatchAugment(config.augment, num_classes=num_classes,
                                                 label_smoothing=config.optim.label_smoothing)
        return cls(config.optim.label_smoothing, augment)

    def network(self, config, num_classes, *, sync_bn=False) -> nn.Module:
        return create_model(config.model, num_classes, config.data.image_size,
                            dynamic_size=bool(config.data.ramp.start_size))

    def inputs(self, images, labels):
        return (images, labels) if self.augment is None else self.augment(images, labels)

    def loss(self, outputs, targets):
        if self.soft is not None:
            return self.soft(outputs, targets)
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)
