"""The model: any timm architecture, from scratch, with the manifest's number of classes."""
from __future__ import annotations

import torch

from .config import ModelConfig


def create_model(config: ModelConfig, num_classes: int, image_size: int) -> torch.nn.Module:
    """timm's model with its own state-dict key names, so `timm.create_model(name, num_classes=N)` loads our
    checkpoints. Models that take an input size (ViTs: the position embedding has one entry per patch) get
    the data's; the others (ResNets) work at any size."""
    import timm
    kwargs = dict(config.kwargs)
    if "img_size" not in kwargs:
        try:
            return timm.create_model(config.name, pretrained=False, num_classes=num_classes, img_size=image_size,
                                     **kwargs)
        except TypeError:  # the architecture has no img_size argument
            pass
    return timm.create_model(config.name, pretrained=False, num_classes=num_classes, **kwargs)
