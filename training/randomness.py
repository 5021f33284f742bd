"""Every random draw of a training step comes from (seed, rank, step), and from nothing else.

A step draws from four generators: Python's `random` and numpy's global one (timm's mixup, cutmix and erasing
choices), and torch's default CPU and CUDA generators (drop path, erasing noise, rotation labels, whatever a
model or objective draws on the device). `seed_step` reseeds all four before each step from (seed, rank, step):
- under DDP each rank draws its own augmentation and its own drop-path masks (a shared seed would give every
  GPU the same mixing weight, box, erased patches and masks, and eight GPUs would train on one augmentation);
- a step's draws depend on its position alone, so a resumed run draws what an uninterrupted one draws there,
  with no generator state to save;
- the same run on one process repeats itself (rank 0).

Reseeding is host-side bookkeeping: torch.manual_seed sets each generator's seed and offset on the host, with no
device work and no sync. What the loaders draw is theirs, seeded per (seed, epoch, rank, batch) in pipelines/.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def step_seeds(seed: int, rank: int, step: int) -> tuple[int, int, int]:
    """The (Python, numpy, torch) seeds of one step of one rank: independent streams from one SeedSequence."""
    python, numpy_seed, torch_seed = np.random.SeedSequence([seed, rank, step]).generate_state(3)
    return int(python), int(numpy_seed), int(torch_seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Reseeds Python's, numpy's and torch's generators (CPU and every CUDA device) for optimizer step `step`
    (0-based: the step the next batch trains) of rank `rank`."""
    python, numpy_seed, torch_seed = step_seeds(seed, rank, step)
    random.seed(python)
    np.random.seed(numpy_seed)
    torch.manual_seed(torch_seed)  # also every CUDA device's default generator (lazily, before CUDA starts)
