"""The colour half of the SimCLR view augmentation (contract.SSL_*), run in torch on whichever device holds the
batch: colour jitter (p = 0.8), grayscale (p = 0.2), Gaussian blur (p = 0.5), each drawn per image.

Used by the ffcv loader with views=2. FFCV's numba stages do the geometry while decoding (random-resized-crop
and flip on the CPU, where libjpeg-turbo decodes at a reduced scale when the crop allows); FFCV has no colour
operators, and they cost more than the decode on the CPU (a hue shift goes through HSV), so they run here, on
the uint8 batch after it reached the device, in float in [0, 1]; contract.normalize follows.

kornia's augmentations draw their parameters per image (torchvision's formulas for jitter: brightness and
contrast multiply and blend, saturation blends with the grayscale, hue rotates in HSV) and run batched. They
draw on the CPU and copy the parameters over without blocking; an operation with p < 1 runs on the whole
batch and keeps its result per image with `torch.where` (kornia 0.9), so nothing waits for the GPU.
"""
from __future__ import annotations

import torch
from torch import nn

from .contract import (SSL_BLUR_P, SSL_BLUR_SIGMA, SSL_BRIGHTNESS, SSL_CONTRAST, SSL_GRAY_P, SSL_HUE, SSL_JITTER_P,
                       SSL_SATURATION, blur_kernel_size)


class ColourAugment(nn.Module):
    """float B x 3 x H x W in [0, 1] -> the same, colour-augmented per image, channels_last. The probabilities
    are arguments so that a test can switch each operation on or off."""

    def __init__(self, image_size: int, *, jitter_p: float = SSL_JITTER_P, gray_p: float = SSL_GRAY_P,
                 blur_p: float = SSL_BLUR_P):
        super().__init__()
        import kornia.augmentation as K
        size = blur_kernel_size(image_size)
        self.ops = nn.Sequential(
            K.ColorJitter(SSL_BRIGHTNESS, SSL_CONTRAST, SSL_SATURATION, SSL_HUE, p=jitter_p),
            K.RandomGrayscale(p=gray_p),
            K.RandomGaussianBlur((size, size), SSL_BLUR_SIGMA, p=blur_p))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ops(images).contiguous(memory_format=torch.channels_last)
