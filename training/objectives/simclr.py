"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"): two
augmented views per image (the loader's views=2), a projection head on the backbone's pooled features, and the
NT-Xent / InfoNCE loss with the other 2N-2 views of the (global) batch as negatives."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .base import Objective


class SimCLR(Objective):
    name, views, resolution_ramp = "simclr", 2, False

    def __init__(self, temperature: float, hidden: int, out: int):
        self.temperature, self.hidden, self.out = temperature, hidden, out

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> "SimCLR":
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
