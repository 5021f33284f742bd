"""Masked-image reconstruction: a masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners", CVPR; the paper's code: github.com/facebookresearch/mae, models_mae.py).

Each image's patches are shuffled by random noise and the first (1 - mask_ratio) of them are kept: the encoder
(the timm ViT, its blocks unchanged) runs on those alone, a quarter of the tokens at the default 0.75, which is
what makes MAE cheap per image. A light transformer decoder gets the encoded visible tokens back in place, a
shared learned mask token in every removed place, and a fixed 2-D sin-cos position embedding, and predicts each
patch's pixels. The loss is the mean squared error over the removed patches only, against each patch's pixels
normalized to zero mean and unit variance (norm_pix_loss, the paper's default: sharper features, its Table 1d).

The noise is drawn by `MAE.inputs` on the device after the loop seeded (seed, rank, step), so every rank masks
differently and a resumed run draws the masks of an uninterrupted one. The network's forward computes the loss
itself, so that masking, encoder, decoder and loss are one compiled graph, with no host-device sync (the kept
count is a Python number fixed by the image size).

The backbone saved in checkpoints is the plain timm ViT (num_classes=0): fine-tuning and probes load it through
--init, or `timm.create_model(name, num_classes=0, checkpoint_path=...)`. Its position embedding is timm's learned
one, where the paper fixes a sin-cos one in the encoder too.
"""
from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from ..config import Config, ConfigError
from ..model import create_model
from .base import Objective, SSLModel, three_channels
from .pictures import image_grid, unnormalize


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """B x C x H x W -> B x N x (patch * patch * C), patches in row-major order, each (row, column, channel) as
    the paper's code lays them out."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of patchify: B x N x (patch * patch * C) -> B x C x height x width."""
    b, _, d = patches.shape
    c = d // (patch * patch)
    x = patches.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def pixel_targets(images: torch.Tensor, patch: int, normalize: bool) -> torch.Tensor:
    """Each patch's pixels in float32; with `normalize` (norm_pix_loss) to zero mean and unit variance per patch
    (the unbiased variance, + 1e-6, as the paper's code)."""
    target = patchify(images.float(), patch)
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The mean over removed patches (removed == 1) of each patch's mean squared error, in float32."""
    per_patch = ((prediction.float() - target) ** 2).mean(dim=-1)
    return (per_patch * removed).sum() / removed.sum()


class MAEDecoder(nn.Module):
    """The encoded visible tokens back in place among mask tokens, through `depth` transformer blocks of `width`,
    to each patch's pixels."""

    def __init__(self, encoder_width: int, grid: tuple[int, int], patch: int, prefix: int, width: int, depth: int,
                 heads: int, channels: int = 3):
        super().__init__()
        self.prefix, self.patches = prefix, grid[0] * grid[1]
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # fixed, so not saved: rebuilt from the grid (the paper's decoder_pos_embed, requires_grad=False)
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(grid), width).unsqueeze(0),
                             persistent=False)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch * patch * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():  # the paper's init: xavier-uniform linears, unit LayerNorms
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """latent: B x (prefix + K) x D from the encoder; keep: B x K patch indices -> B x N x patch pixels."""
        x = self.embed(latent)
        b, width = x.shape[0], x.shape[-1]
        index = keep.unsqueeze(-1).expand(-1, -1, width)
        tokens = self.mask_token.to(x.dtype).expand(b, self.patches, width).scatter(1, index, x[:, self.prefix:])
        x = torch.cat([x[:, :self.prefix], tokens + self.pos_embed.to(x.dtype)], dim=1)
        return self.pred(self.norm(self.blocks(x)))[:, self.prefix:]


class MAEModel(SSLModel):
    """The timm ViT (`backbone`, run on the visible patches) and the MAEDecoder (`head`). forward((images, noise))
    returns (loss, prediction, keep)."""

    def __init__(self, encoder: nn.Module, decoder: MAEDecoder, patch: int, keep: int, norm_pix_loss: bool):
        super().__init__(encoder, decoder)
        self.patch, self.keep, self.norm_pix_loss = patch, keep, norm_pix_loss

    def encode(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder on the `self.keep` patches with the lowest noise; returns (B x (prefix + K) x D, keep)."""
        enc = self.backbone
        x = enc._pos_embed(enc.patch_embed(images))  # timm's: position embedding added, class token prepended
        prefix = enc.num_prefix_tokens
        keep = noise.argsort(dim=1)[:, :self.keep]
        visible = torch.gather(x[:, prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], visible], dim=1)
        return enc.norm(enc.blocks(enc.norm_pre(x))), keep

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]):
        images, noise = batch
        latent, keep = self.encode(images, noise)
        prediction = self.head(latent, keep)
        removed = torch.ones(noise.shape, device=noise.device).scatter(1, keep, 0.0)
        target = pixel_targets(images, self.patch, self.norm_pix_loss)
        return masked_mse(prediction, target, removed), prediction, keep


class MAE(Objective):
    # one size: the decoder's position embedding and the kept count are fixed by data.image_size
    name, pictured, resolution_ramp = "mae", 8, False

    def __init__(self, mask_ratio: float, depth: int, width: int, heads: int, norm_pix_loss: bool):
        self.mask_ratio, self.depth, self.width, self.heads = mask_ratio, depth, width, heads
        self.norm_pix_loss = norm_pix_loss
        self.patch = 0  # set by network(): the encoder's

    @classmethod
    def check(cls, config: Config) -> None:
        super().check(config)
        mae = config.mae
        if not 0 < mae.mask_ratio < 1:
            raise ConfigError(f"mae.mask_ratio {mae.mask_ratio} must be in (0, 1): the share of patches removed")
        if mae.decoder_depth < 1 or mae.decoder_width < 1 or mae.decoder_heads < 1:
            raise ConfigError(f"mae.decoder_depth, decoder_width and decoder_heads must be positive (got "
                              f"{mae.decoder_depth}, {mae.decoder_width}, {mae.decoder_heads})")
        if mae.decoder_width % mae.decoder_heads:
            raise ConfigError(f"mae.decoder_width {mae.decoder_width} is not a multiple of mae.decoder_heads "
                              f"{mae.decoder_heads}: each head gets width / heads channels")
        three_channels(config)

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> "MAE":
        m = config.mae
        return cls(m.mask_ratio, m.decoder_depth, m.decoder_width, m.decoder_heads, m.norm_pix_loss)

    def network(self, config, num_classes, *, sync_bn=False) -> nn.Module:
        encoder = create_model(config.model, 0, config.data.image_size)
        embed = getattr(encoder, "patch_embed", None)
        if embed is None or not hasattr(encoder, "_pos_embed") or not hasattr(encoder, "blocks"):
            raise ConfigError(f"train.objective=mae needs a timm VisionTransformer (patch_embed, blocks); "
                              f"{config.model.name} is a {type(encoder).__name__}")
        self.patch = int(embed.patch_size[0])
        grid = tuple(int(g) for g in embed.grid_size)
        patches = grid[0] * grid[1]
        keep = round(patches * (1 - self.mask_ratio))
        if not 0 < keep < patches:
            raise ConfigError(f"mae.mask_ratio {self.mask_ratio} keeps {keep} of the {patches} patches of a "
                              f"{config.data.image_size}-px image: at least one must be seen and one removed")
        decoder = MAEDecoder(encoder.num_features, grid, self.patch, encoder.num_prefix_tokens, self.width,
                             self.depth, self.heads)
        return MAEModel(encoder, decoder, self.patch, keep, self.norm_pix_loss)

    def inputs(self, images, labels):
        """(images, noise): one uniform draw per patch, on the device; the lowest (1 - mask_ratio) are kept."""
        b, _, h, w = images.shape
        noise = torch.rand(b, (h // self.patch) * (w // self.patch), device=images.device)
        return (images, noise), None

    def loss(self, outputs, targets):
        return outputs[0]

    @torch.no_grad()
    def pictures(self, network, images, autocast):
        """Per image: the masked input (removed patches gray), the reconstruction (predicted patches, brought back
        to the image's own patch statistics under norm_pix_loss, with the visible patches pasted in, as the
        paper's figures show it) and the original."""
        was_training = network.training
        network.eval()
        noise = torch.rand(images.shape[0], network.head.patches, device=images.device,
                           generator=torch.Generator(images.device).manual_seed(0))
        with autocast():
            _, prediction, keep = network((images, noise))
        network.train(was_training)
        h, w = images.shape[-2:]
        original = patchify(images.float(), self.patch)
        prediction = prediction.float()
        if self.norm_pix_loss:
            mean, var = original.mean(-1, keepdim=True), original.var(-1, keepdim=True)
            prediction = prediction * (var + 1e-6) ** 0.5 + mean
        seen = torch.zeros(noise.shape, device=images.device).scatter(1, keep, 1.0).unsqueeze(-1)
        gray = torch.zeros_like(original)  # 0 in normalized units: ImageNet's mean colour
        masked = unpatchify(original * seen + gray * (1 - seen), self.patch, h, w)
        rebuilt = unpatchify(original * seen + prediction * (1 - seen), self.patch, h, w)
        return image_grid([unnormalize(masked), unnormalize(rebuilt), unnormalize(images)])

