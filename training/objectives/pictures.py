"""Image grids of what an objective makes of a few holdout images (Objective.pictures)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD

MIN_SIDE = 96  # smaller images (the tiny CPU presets' 32 px) are enlarged, nearest-neighbour, to be seen


def rgb_planes(images: torch.Tensor) -> list[torch.Tensor]:
    """Loader-normalized images (pipelines/contract.py's mean and std) -> their R, G, B planes in [0, 1], float32.
    The constants are Python numbers: no tensor is made on the host, so this may run in a training step."""
    return [(images[:, c].float() * IMAGENET_STD[c] + IMAGENET_MEAN[c]).clamp(0, 1) for c in range(3)]


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Loader-normalized images back to RGB in [0, 1], B x 3 x H x W float32."""
    return torch.stack(rgb_planes(images), dim=1)


def image_grid(columns: list[torch.Tensor]) -> torch.Tensor:
    """One row per image, one column per tensor of `columns` (each B x 3 x H x W in [0, 1]): 3 x H' x W'."""
    from torchvision.utils import make_grid
    side = columns[0].shape[-1]
    scale = max(1, MIN_SIDE // side)
    if scale > 1:
        columns = [F.interpolate(c, scale_factor=scale, mode="nearest") for c in columns]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # image 0's columns, then image 1's, ...
    return make_grid(rows, nrow=len(columns), padding=2, pad_value=1.0)
