"""The colour half of the SimCLR view augmentation (contract.TWO_VIEWS), run in torch on whichever device holds
the batch: colour jitter (p = 0.8), grayscale (p = 0.2), Gaussian blur (p = 0.5), each drawn per image.

Used by the ffcv loader with views=2. FFCV's numba stages do the geometry while decoding (random-resized-crop
and flip on the CPU, where libjpeg-turbo decodes at a reduced scale when the crop allows); FFCV has no colour
operators, and they cost more than the decode on the CPU (a hue shift goes through HSV), so they run here, on
the uint8 batch after it reached the device, in float in [0, 1]; contract.normalize follows.

The draws come from the generators the loader hands over (batch_random), seeded from (seed, epoch, rank, batch)
alone, as the loaders' RandAugment draws are, and not from torch's global generator: under DDP each rank draws
its own jitter, grayscale and blur, and a batch's draws depend only on its position, so a resumed run or a seek
draws them again.

No host-device sync and no host-to-device copy per batch: every per-image number (the gates, the jitter
factors, the blur's sigma) is drawn on the batch's device with one `torch.rand`, applied with kornia's
functional ops, which take per-image factor tensors, and kept per image with `torch.where`. Whether an
operation runs at all depends only on its probability (a Python number), never on a drawn value. kornia's
augmentation modules (ColorJitter, RandomGaussianBlur) are not used: on a CUDA batch they read their drawn
parameters back to the host every call (ColorJitter's `order.tolist()` and its per-step `if factor.any()`,
gaussian_blur2d's check that every sigma is positive), three or more stream syncs per view.

The formulas are torchvision's ColorJitter (brightness scales, contrast blends with the grayscale mean,
saturation blends with the grayscale, hue rotates in HSV; factors uniform in [1 - s, 1 + s], hue in
[-h, h] turns), RandomGrayscale and GaussianBlur (one sigma for both axes, reflected borders). As in kornia's
ColorJitter, the order of the four jitter steps is drawn once per view (on the host: no device work), where
torchvision draws one per image: a per-image order would run each step four times over the batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .contract import TWO_VIEWS, blur_kernel_size

# Rows of the per-image uniform draws (one torch.rand(DRAWS, B) per call).
JITTER_GATE, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY_GATE, BLUR_GATE, SIGMA = range(8)
DRAWS = 8


class BatchRandom(NamedTuple):
    """Where one batch's colour draws come from. Both views draw from it in turn, so they differ."""
    device: torch.Generator  # on the batch's device: the per-image numbers
    host: np.random.Generator  # the jitter order, which decides what runs next and so must not wait for the device


def batch_random(device: torch.device, seed: int, epoch: int, rank: int, batch: int) -> BatchRandom:
    """The generators of one batch's colour draws, seeded from (seed, epoch, rank, batch) alone: the device one as
    RandAugment's (rand_augment.batch_generator; a loader runs one of the two, never both), the host one as DALI's
    index reader seeds its host draws (numpy's, from the same four numbers). Seeding makes no device work."""
    from .rand_augment import batch_generator
    return BatchRandom(batch_generator(device, seed, epoch, rank, batch),
                       np.random.default_rng([seed, epoch, rank, batch]))


def jitter_steps():
    """The four ColorJitter steps as (row of the draws, fn(images, uniform in [0, 1) per image))."""
    from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, adjust_hue,
                                adjust_saturation_with_gray_subtraction)

    def spread(u, strength):  # torchvision's [max(0, 1 - s), 1 + s]
        low = max(0.0, 1 - strength)
        return low + (1 + strength - low) * u

    return (
        (BRIGHTNESS, lambda x, u: adjust_brightness_accumulative(x, spread(u, TWO_VIEWS.brightness))),
        (CONTRAST, lambda x, u: adjust_contrast_with_mean_subtraction(x, spread(u, TWO_VIEWS.contrast))),
        (SATURATION, lambda x, u: adjust_saturation_with_gray_subtraction(x, spread(u, TWO_VIEWS.saturation))),
        # torchvision's hue factor is in turns of the hue circle, kornia's in radians
        (HUE, lambda x, u: adjust_hue(x, (2 * u - 1) * TWO_VIEWS.hue * 2 * math.pi)),
    )


def keep_where(gate: torch.Tensor, changed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image: `changed` where its gate is set, else `images`."""
    return torch.where(gate.view(-1, 1, 1, 1), changed, images)


class ColourAugment(nn.Module):
    """float B x 3 x H x W in [0, 1] -> the same, colour-augmented per image, channels_last, drawn from the
    BatchRandom it is given. The probabilities are arguments so that a test can switch each operation on or off."""

    def __init__(self, image_size: int, *, jitter_p: float = TWO_VIEWS.jitter_p, gray_p: float = TWO_VIEWS.gray_p,
                 blur_p: float = TWO_VIEWS.blur_p):
        super().__init__()
        self.jitter_p, self.gray_p, self.blur_p = jitter_p, gray_p, blur_p
        self.kernel_size = blur_kernel_size(image_size)
        self.steps = jitter_steps()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, random: BatchRandom) -> torch.Tensor:
        """`random.device` is a generator on the images' device (batch_random); each call moves both on."""
        draws = torch.rand(DRAWS, images.shape[0], device=images.device, generator=random.device)
        order = random.host.permutation(len(self.steps)).tolist()
        return self.augment(images, draws, order)

    def augment(self, images: torch.Tensor, draws: torch.Tensor, order: list[int]) -> torch.Tensor:
        """forward with its random numbers given: `draws` DRAWS x B uniforms in [0, 1) on the images' device
        (rows named above); `order` the jitter steps' order, a permutation of 0-3 (brightness, contrast,
        saturation, hue)."""
        from kornia.color import rgb_to_grayscale
        from kornia.filters import filter2d_separable, get_gaussian_kernel1d
        out = images
        if self.jitter_p > 0:
            jittered = out
            for index in order:
                row, step = self.steps[index]
                jittered = step(jittered, draws[row])
            out = self.gated(draws[JITTER_GATE], self.jitter_p, jittered, out)
        if self.gray_p > 0:
            gray = rgb_to_grayscale(out).expand_as(out)
            out = self.gated(draws[GRAY_GATE], self.gray_p, gray, out)
        if self.blur_p > 0:
            low, high = TWO_VIEWS.blur_sigma
            sigma = (low + (high - low) * draws[SIGMA]).view(-1, 1)
            kernel = get_gaussian_kernel1d(self.kernel_size, sigma)  # B x size: one kernel per image
            blurred = filter2d_separable(out, kernel, kernel, border_type="reflect")
            out = self.gated(draws[BLUR_GATE], self.blur_p, blurred, out)
        return out.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def gated(uniform: torch.Tensor, p: float, changed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Each image changed with probability p (p = 1: every one, with no selection to run)."""
        return changed if p >= 1 else keep_where(uniform < p, changed, images)
