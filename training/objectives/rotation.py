"""Rotation prediction (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image
Rotations"): each image is rotated by r x 90 degrees on the device, and a 4-way linear head predicts r."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Objective


class Rotation(Objective):
    name = "rotation"

    def head(self, features):
        return nn.Linear(features, 4)

    def inputs(self, images, labels):
        return rotate(images)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def rotate(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates image b by labels[b] x 90 degrees counter-clockwise (torch.rot90 on the H, W dims); returns
    (rotated images, labels). The labels are a random permutation of 0,1,2,3,0,1,... so that every batch is
    balanced over the 4 classes. Square images only: a 90-degree turn of a non-square one changes its shape
    (and would give the label away). All on the device, no host sync; the result is channels_last."""
    b, _, h, w = images.shape
    if h != w:
        raise ValueError(f"rotation prediction needs square images, got {h} x {w}")
    labels = torch.randperm(b, device=images.device) % 4
    out = images
    for r in (1, 2, 3):
        chosen = (labels == r).view(b, 1, 1, 1)
        out = torch.where(chosen, torch.rot90(images, r, dims=(2, 3)), out)
    return out.contiguous(memory_format=torch.channels_last), labels
