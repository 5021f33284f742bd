"""The objective's contract, and what every objective shares: the backbone-plus-head network and its weights.

Self-supervised objectives train a network with a `backbone` (the timm model created with num_classes=0, whose
forward returns the pooled features, under timm's key names) and a `head` (whatever else the objective trains:
a projection MLP, a decoder). Checkpoints save the backbone as "model" (what `timm.create_model(name,
num_classes=0, checkpoint_path=...)` and --init read) and the head apart, as "objective_head".
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config, ConfigError, augmentations_on
from ..model import create_model


class Objective:
    """What a training step minimizes. The loop calls, each step after seeding (seed, rank, step):
    `inputs(images, labels)` (device-side preparation of the batch), `loss(network(inputs), targets)`, and after
    the optimizer's step `after_step(step)`. None of them may read anything back from the device."""
    name = ""
    views = 1  # images per sample the train loader yields (build_loader's views)
    supervised = False  # trains on the labels, evaluated by top-1; the others by k-NN on frozen features
    batch_augment = False  # accepts DeiT's augmentation (RandAugment, mixup, cutmix, erasing)
    resolution_ramp = True  # trains at the sizes of a data.ramp
    best_metric = "knn_top1"  # the holdout figure (higher is better) that picks best.pt
    pictured = 0  # holdout images `pictures` draws at each evaluation (0: none)

    @classmethod
    def check(cls, config: Config) -> None:
        """Raises ConfigError for a config this objective cannot train with, naming the key. Subclasses add
        their settings' checks and call this one."""
        name = config.train.objective
        if config.data.ramp.start_size and not cls.resolution_ramp:
            raise ConfigError(f"data.ramp with train.objective={name}: this objective trains at data.image_size"
                              + (" (its two-view loaders have no ramp)" if cls.views > 1 else ""))
        deit = augmentations_on(config.augment)
        if deit and not cls.batch_augment:
            raise ConfigError(f"augment.{', augment.'.join(deit)} with train.objective={name}: DeiT's augmentation "
                              "is for supervised training (the self-supervised objectives bring their own views and "
                              "targets)")
        if config.model.compile_eval and not (config.model.compile and cls.supervised):
            raise ConfigError("model.compile_eval compiles the supervised evaluation: it needs model.compile=true and "
                              "train.objective=supervised (k-NN runs uncompiled)")

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> "Objective":
        """The objective with `config`'s settings."""
        return cls()

    def network(self, config: Config, num_classes: int, *, sync_bn: bool = False) -> nn.Module:
        """The module a run trains: by default SSLModel(the timm backbone with num_classes=0, self.head(width)).
        `sync_bn`: under DDP on GPUs, the head's BatchNorm sees the global batch."""
        backbone = create_model(config.model, 0, config.data.image_size,
                                dynamic_size=bool(config.data.ramp.start_size))
        head = self.head(backbone.num_features)
        if sync_bn:
            head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
        return SSLModel(backbone, head)

    def head(self, features: int) -> nn.Module:
        """The module on the backbone's pooled features (for the default network)."""
        raise NotImplementedError

    def inputs(self, images, labels: torch.Tensor) -> tuple[object, object]:
        """A loader batch -> (what the network gets, what the loss compares with), on the device, no sync."""
        return images, labels

    def loss(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after optimizer step number `step` (a momentum teacher would update here)."""

    def state_dict(self) -> dict:
        """The objective's own state beyond the network's weights (saved in last.pt as "objective_state")."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict (on a resume)."""

    def backbone(self, network: nn.Module) -> nn.Module:
        """The timm model inside the network: what k-NN, the linear probe and fine-tuning use."""
        return backbone_of(network)

    @torch.no_grad()
    def pictures(self, network: nn.Module, images: torch.Tensor, autocast) -> torch.Tensor | None:
        """What the network makes of a few fixed holdout images, as one image grid (3 x H x W, floats in [0, 1])
        for the run directory and TensorBoard; None when the objective has nothing to show."""
        return None


class SSLModel(nn.Module):
    """A timm backbone created with num_classes=0 (forward = pooled features) and an objective's head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def no_weight_decay(self) -> set[str]:
        """timm's optimizer factory skips weight decay on these (the position embedding and class token, and
        the head's own, such as a decoder's mask token)."""
        inner = getattr(self.backbone, "no_weight_decay", None)
        head = getattr(self.head, "no_weight_decay", None)
        return ({f"backbone.{name}" for name in (inner() if inner else ())}
                | {f"head.{name}" for name in (head() if head else ())})


def backbone_of(network: nn.Module) -> nn.Module:
    """The timm model inside a network."""
    return network.backbone if isinstance(network, SSLModel) else network


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm model's pooled pre-logits features (the ViT's normed class token), whatever its num_classes."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def checkpoint_weights(network: nn.Module) -> dict:
    """A checkpoint's weights. "model": the timm model's state dict under timm's key names, loadable with
    `timm.create_model(name, num_classes=<"num_classes">)`; for self-supervised runs also "objective_head"."""
    if isinstance(network, SSLModel):
        return {"model": network.backbone.state_dict(), "objective_head": network.head.state_dict(),
                "num_classes": 0}  # the backbone was created with num_classes=0: no classifier keys
    return {"model": network.state_dict()}


def load_checkpoint_weights(network: nn.Module, saved: dict) -> None:
    """The inverse of checkpoint_weights (resume): strict, every key."""
    if isinstance(network, SSLModel):
        network.backbone.load_state_dict(saved["model"])
        network.head.load_state_dict(saved["objective_head"])
    else:
        network.load_state_dict(saved["model"])


def three_channels(config: Config) -> None:
    """The loaders yield RGB: a model built for another channel count cannot take their batches."""
    channels = dict(config.model.kwargs).get("in_chans", 3)
    if channels != 3:
        raise ConfigError(f"model.kwargs in_chans={channels} with train.objective={config.train.objective}: its "
                          "input is the loader's 3-channel image; build the model with in_chans=3")
