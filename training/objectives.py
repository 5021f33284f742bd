"""What a training step minimizes: supervised cross-entropy, SimCLR's NT-Xent, or rotation prediction.

The loop only calls `objective.inputs(images, labels)` (device-side preparation of a batch) and
`objective.loss(model(inputs), targets)`; everything specific to an objective lives here.

- supervised: the timm model with the manifest's classes; cross-entropy on the labels.
- simclr (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"): two
  augmented views per image (the loader's views=2), a projection head on the backbone's pooled features, and
  the NT-Xent / InfoNCE loss with the other 2N-2 views of the (global) batch as negatives.
- rotation (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image
  Rotations"): each image is rotated by r x 90 degrees on the device, and a 4-way linear head predicts r.

The self-supervised objectives train `SSLModel(backbone, head)`: the backbone is the timm model created with
num_classes=0 (its forward returns the pooled features, under timm's key names), so checkpoints save the
backbone as "model" (what `timm.create_model(name, num_classes=0, checkpoint_path=...)` and --init read) and
the objective's head apart, as "objective_head".
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from . import batch_augment
from .config import Config
from .model import create_model


class Objective:
    name = "supervised"
    views = 1  # images per sample the train loader yields (build_loader's views)
    supervised = True  # evaluated by top-1 on the labels; the others by k-NN on frozen features

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> "Objective":
        """The objective with `config`'s settings (build_objective)."""
        return cls()

    def head(self, features: int) -> nn.Module | None:
        """The module on the backbone's pooled features (None: the timm model's own classifier)."""
        return None

    def inputs(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A loader batch -> (what the model gets, what the loss compares with), on the device, no sync."""
        return images, labels

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class Supervised(Objective):
    """Cross-entropy on the labels; with a BatchAugment (training/batch_augment.py: random erasing, mixup,
    cutmix) the batch is augmented on the device first, and mixing makes the targets soft."""

    def __init__(self, label_smoothing: float = 0.0, augment=None):
        self.label_smoothing, self.augment = label_smoothing, augment
        # timm's SoftTargetCrossEntropy for mixup's soft targets (they already hold the label smoothing)
        self.soft = SoftTargetCrossEntropy() if augment is not None and augment.soft_targets else None

    @classmethod
    def from_config(cls, config, num_classes):
        augment = None
        if batch_augment.enabled(config.augment):
            if (config.augment.mixup or config.augment.cutmix) and num_classes < 2:
                raise ValueError("build_objective: mixup and cutmix need the dataset's num_classes for their targets")
            augment = batch_augment.BatchAugment(config.augment, num_classes=num_classes,
                                                 label_smoothing=config.optim.label_smoothing)
        return cls(config.optim.label_smoothing, augment)

    def inputs(self, images, labels):
        return (images, labels) if self.augment is None else self.augment(images, labels)

    def loss(self, outputs, targets):
        if self.soft is not None:
            return self.soft(outputs, targets)
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)


class SimCLR(Objective):
    name, views, supervised = "simclr", 2, False

    def __init__(self, temperature: float, hidden: int, out: int):
        self.temperature, self.hidden, self.out = temperature, hidden, out

    @classmethod
    def from_config(cls, config, num_classes):
        return cls(config.ssl.temperature, config.ssl.proj_hidden_dim, config.ssl.proj_dim)

    def head(self, features):
        # SimCLR's projection MLP (appendix B.9: the loss on g(h) rather than on h is what makes h good for
        # transfer); BN after the hidden layer as in SimCLR v2 and MoCo v3, whose widths (4096/256) we halve
        # in the hidden layer. The bias before BN would be cancelled by it.
        return nn.Sequential(nn.Linear(features, self.hidden, bias=False), nn.BatchNorm1d(self.hidden),
                             nn.ReLU(inplace=True), nn.Linear(self.hidden, self.out))

    def inputs(self, images, labels):
        if not isinstance(images, (tuple, list)) or len(images) != 2:
            raise TypeError("the simclr objective needs a loader built with views=2, which yields "
                            f"((view1, view2), labels); got {type(images).__name__}")
        # One forward over both views: B view-1 rows, then B view-2 rows (info_nce's layout). The BN of the head
        # normalizes over both views together, as SimCLR's does.
        return torch.cat(tuple(images)), None

    def loss(self, outputs, targets):
        return info_nce(outputs, self.temperature)


class Rotation(Objective):
    name, supervised = "rotation", False

    def head(self, features):
        return nn.Linear(features, 4)

    def inputs(self, images, labels):
        return rotate(images)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


# train.objective's values: the config's check and the CLI's --objective read the names from here.
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Supervised, SimCLR, Rotation)}


def build_objective(config: Config, num_classes: int = 0) -> Objective:
    """train.objective's Objective. `num_classes` is needed for mixup's soft targets (augment.mixup or
    augment.cutmix)."""
    return OBJECTIVES[config.train.objective].from_config(config, num_classes)


def info_nce(z: torch.Tensor, temperature: float, *, gather: bool = True, reduction: str = "mean") -> torch.Tensor:
    """NT-Xent over 2N embeddings: rows [0, N) are view 1 of N images, rows [N, 2N) view 2, in the same order.

    For anchor i with positive j (the other view of its image) and s the cosine similarity,
        l_i = -log( exp(s(z_i, z_j) / t) / sum_{k != i} exp(s(z_i, z_k) / t) )
    which is cross-entropy over the similarities with the anchor itself masked out. Under DDP every rank's
    embeddings are gathered *with* their gradients (torch.distributed.nn.functional.all_gather: the backward
    pass returns each rank the gradient of every rank's loss), so the negatives are the global batch's
    2N x world_size - 2 other views, as in SimCLR's cross-core gathering. Each rank returns the mean over its
    own 2N anchors; DDP's gradient averaging then yields the gradient of the global mean.
    """
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"info_nce needs 2N rows (two views of N images), got {n}")
    with torch.autocast(z.device.type, enabled=False):  # similarities / 0.2 in bf16 would lose the loss's digits
        z = F.normalize(z.float(), dim=1)
        offset, bank = 0, z
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather
            bank = torch.cat(all_gather(z))  # rank r's rows are [r * 2N, (r + 1) * 2N)
            offset = dist.get_rank() * n
        logits = z @ bank.T / temperature
        rows = torch.arange(n, device=z.device)
        own = F.one_hot(rows + offset, bank.shape[0]).bool()
        logits = logits.masked_fill(own, float("-inf"))  # k != i
        positives = (rows + n // 2) % n + offset
        return F.cross_entropy(logits, positives, reduction=reduction)


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


class SSLModel(nn.Module):
    """A timm backbone created with num_classes=0 (forward = pooled features) and an objective's head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def no_weight_decay(self) -> set[str]:
        """timm's optimizer factory skips weight decay on these (the position embedding and class token)."""
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in (inner() if inner else ())}


def build_network(config: Config, objective: Objective, num_classes: int, *, sync_bn: bool = False) -> nn.Module:
    """The module a run trains: the timm model (supervised), or SSLModel(backbone, head)."""
    dynamic_size = bool(config.data.ramp.start_size)  # a resolution ramp: one model at every size
    if objective.supervised:
        return create_model(config.model, num_classes, config.data.image_size, dynamic_size=dynamic_size)
    backbone = create_model(config.model, 0, config.data.image_size, dynamic_size=dynamic_size)
    head = objective.head(backbone.num_features)
    if sync_bn:  # under DDP on GPUs: the head's BN sees the global batch, as in SimCLR and MoCo v3
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return SSLModel(backbone, head)


def backbone_of(network: nn.Module) -> nn.Module:
    """The timm model inside a network: what k-NN and transfer use."""
    return network.backbone if isinstance(network, SSLModel) else network


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm model's pooled pre-logits features (the ViT's normed class token), whatever its num_classes."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def checkpoint_weights(network: nn.Module) -> dict:
    """A checkpoint's weights. "model": the timm model's state dict under timm's key names, loadable with
    `timm.create_model(name, num_classes=<"num_classes">)`; for SSL runs also "objective_head"."""
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
