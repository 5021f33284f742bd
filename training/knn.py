"""k-NN top-1 on frozen features: how good a self-supervised representation is, with no training at all.

The bank is the backbone's pooled features of a labelled split (train, read with eval transforms), the queries
those of a held-out split; both are L2-normalized, so the dot product is the cosine similarity. Each query's k
nearest neighbours vote for their labels with weight exp(similarity / T): k = 20, T = 0.07, as in Wu et al.
2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", sec. 3.4) and DINO's
eval_knn.py. Under DDP every rank extracts its share of the bank, the shares are gathered (all ranks hold the
whole bank), every rank classifies its share of the queries and the correct counts are summed.

Memory: the bank is N x d float32 on the device (ImageNet's 1.15 M x 768 for ViT-B: 3.5 GB); the similarities
are computed `chunk` queries at a time (256 x 1.15 M x 4 bytes: 1.2 GB).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import all_reduce_sum
from .objectives import pooled_features


@torch.no_grad()
def extract(model: torch.nn.Module, batches, autocast: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (normalized float32 features, labels) of a split; `model` is a timm model, in eval mode."""
    features, labels = [], []
    for images, targets in batches:
        with autocast():
            out = pooled_features(model, images)
        features.append(F.normalize(out.float(), dim=1))
        labels.append(targets)
    if not features:
        device = next(model.parameters()).device
        return torch.zeros(0, model.num_features, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def gather(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows, concatenated in rank order (ranks may hold one row more or less than the others)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    most = max(counts)
    pad = most - features.shape[0]
    features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    labels = torch.cat([labels, labels.new_zeros(pad)])
    all_features = [torch.empty_like(features) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_features, features)
    dist.all_gather(all_labels, labels)
    return (torch.cat([f[:c] for f, c in zip(all_features, counts)]),
            torch.cat([lab[:c] for lab, c in zip(all_labels, counts)]))


def predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, num_classes: int, k: int = 20,
            temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Weighted k-NN: each query's class is argmax_c sum over its k most similar bank rows of label c of
    exp(similarity / temperature). Rows must be L2-normalized."""
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start:start + chunk] @ bank.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else bank_labels.new_zeros(0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, bank_batches, query_splits: dict, *, num_classes: int, k: int,
             temperature: float, autocast: Callable[[], object]) -> dict:
    """{split: {"knn_top1", "samples", "bank"}} for each query split; `model` is the timm backbone."""
    was_training = model.training
    model.eval()
    bank, bank_labels = gather(*extract(model, bank_batches, autocast))
    results = {}
    for split, batches in query_splits.items():
        queries, labels = extract(model, batches, autocast)
        predicted = predict(bank, bank_labels, queries, num_classes=num_classes, k=k, temperature=temperature)
        # The count is filled on the device: torch.tensor(n, device=cuda) would copy from the host and wait.
        totals = all_reduce_sum(torch.stack([(predicted == labels).sum(), labels.new_full((), labels.numel())]))
        correct, samples = (int(t) for t in totals.tolist())
        results[split] = {"knn_top1": correct / max(samples, 1), "samples": samples, "bank": bank.shape[0]}
    model.train(was_training)
    return results
