"""Colorization: the network sees an image's luminance and predicts its colour.

Formulation, and why. The input is the image with its colour removed in CIELAB (L* kept, a* = b* = 0, back to RGB:
a gray image whose lightness is the original's, in all three channels, normalized like every loader batch). The
target is each pixel's a*b* (scaled by 1/110 to about [-1, 1]), predicted per patch: a linear head on each of the
ViT's patch tokens gives the patch's patch x patch x 2 values, as MAE's decoder predicts a patch's pixels. The
loss is the smooth-L1 (Huber) loss.

Zhang, Isola & Efros 2016 ("Colorful Image Colorization", ECCV, sec. 2.1) show that an L2 regression of a*b*
averages the plausible colours of an ambiguous pixel toward gray, and instead classify each pixel over 313
quantized a*b* bins with the rare, saturated bins up-weighted (class rebalancing). That matters when the
colorized picture is the product. Here the product is the backbone's features, and regression keeps the head one
linear layer with 2 outputs per pixel instead of 313, and needs no colour prior estimated over the dataset
before training; Huber's linear tails pull an ambiguous pixel toward the mean less than L2 does. The pictures
(the gray input, the prediction and the original, at each evaluation) show the desaturation that remains.
docs/self_supervised.md compares the objectives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.contract import normalize

from ..config import Config, ConfigError
from ..model import create_model
from .base import Objective, SSLModel, three_channels
from .mae import patchify, unpatchify
from .pictures import image_grid, rgb_planes, unnormalize

AB_SCALE = 110.0  # CIELAB a*, b* of sRGB colours lie within about +-110

# sRGB (D65) to CIE XYZ, the reference white and CIELAB's constants: kornia.color's (rgb_to_xyz, xyz_to_lab),
# which the tests compare against. Written out with Python numbers because kornia builds its constants as new
# tensors on every call: on a GPU each is a host-to-device copy that waits for the stream, every step.
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
WHITE = (0.95047, 1.0, 1.08883)


def linear(c: torch.Tensor) -> torch.Tensor:
    """sRGB's transfer function undone."""
    return torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


def encoded(c: torch.Tensor) -> torch.Tensor:
    """sRGB's transfer function applied to linear light."""
    c = c.clamp(min=0)
    return torch.where(c > 0.0031308, 1.055 * c.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, 12.92 * c)


def to_lab(images: torch.Tensor) -> torch.Tensor:
    """Loader-normalized RGB -> CIELAB (L* in [0, 100], a*b* in about +-110), B x 3 x H x W float32."""
    rgb = [linear(c) for c in rgb_planes(images)]
    x, y, z = (sum(k * c for k, c in zip(row, rgb)) / white for row, white in zip(RGB_TO_XYZ, WHITE))
    fx, fy, fz = (torch.where(t > 0.008856, t.clamp(min=0.008856) ** (1 / 3), 7.787 * t + 4 / 29)
                  for t in (x, y, z))
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def gray_input(images: torch.Tensor) -> torch.Tensor:
    """The image's luminance in all three channels (CIELAB's L* with a* = b* = 0: a neutral gray of the same
    relative luminance Y), normalized as the loaders normalize (contract.normalize), in `images`' dtype,
    channels_last."""
    r, g, b = (linear(c) for c in rgb_planes(images))
    gray = encoded(RGB_TO_XYZ[1][0] * r + RGB_TO_XYZ[1][1] * g + RGB_TO_XYZ[1][2] * b)
    return normalize(gray.unsqueeze(1).expand(-1, 3, -1, -1), images.dtype)


class ColorizeModel(SSLModel):
    """The timm ViT (`backbone`) and a linear `head` on each patch token: forward(gray images) -> B x N x
    (patch * patch * 2) a*b* values (scaled by 1/AB_SCALE)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        return self.head(tokens[:, self.backbone.num_prefix_tokens:])


class Colorize(Objective):
    name, pictured = "colorize", 8

    def __init__(self, huber_delta: float):
        self.huber_delta = huber_delta
        self.patch = 0  # set by network(): the backbone's

    @classmethod
    def check(cls, config: Config) -> None:
        super().check(config)
        if not config.colorize.huber_delta > 0:
            raise ConfigError(f"colorize.huber_delta {config.colorize.huber_delta} must be positive")
        three_channels(config)

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> "Colorize":
        return cls(config.colorize.huber_delta)

    def network(self, config, num_classes, *, sync_bn=False) -> nn.Module:
        backbone = create_model(config.model, 0, config.data.image_size,
                                dynamic_size=bool(config.data.ramp.start_size))
        embed = getattr(backbone, "patch_embed", None)
        if embed is None or not hasattr(backbone, "num_prefix_tokens"):
            raise ConfigError(f"train.objective=colorize needs a timm VisionTransformer (its patch tokens carry the "
                              f"per-patch prediction); {config.model.name} is a {type(backbone).__name__}")
        self.patch = int(embed.patch_size[0])
        return ColorizeModel(backbone, nn.Linear(backbone.num_features, self.patch * self.patch * 2))

    def inputs(self, images, labels):
        """(the gray image, each patch's a*b* / AB_SCALE), made on the device from the loader's batch."""
        return gray_input(images), patchify(to_lab(images)[:, 1:] / AB_SCALE, self.patch)

    def loss(self, outputs, targets):
        return F.smooth_l1_loss(outputs.float(), targets, beta=self.huber_delta)

    @torch.no_grad()
    def pictures(self, network, images, autocast):
        """Per image: the gray input, the prediction (the input's L* with the predicted a*b*) and the original."""
        import kornia  # evaluation only: its per-call constants cost nothing here
        was_training = network.training
        network.eval()
        gray = gray_input(images)
        with autocast():
            predicted = network(gray)
        network.train(was_training)
        lab = to_lab(images)
        h, w = images.shape[-2:]
        ab = unpatchify(predicted.float(), self.patch, h, w) * AB_SCALE
        colour = kornia.color.lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1)).clamp(0, 1)
        return image_grid([unnormalize(gray), colour, unnormalize(images)])
