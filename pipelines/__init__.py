"""Input pipelines behind one contract (pipelines/contract.py): `build_loader(kind, ...)`.

Kinds so far: `torchvision` (the baseline a user would write) and `synthetic` (the upper bound). `dali` and
`ffcv` come with the rest of the pipelines issue. `pipelines.formats` holds the on-disk formats the
converter writes and the loaders read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import synthetic, torchvision_ref
from .contract import Loader

KINDS = {"torchvision": torchvision_ref.build, "synthetic": synthetic.build}


def build_loader(kind: str, data: Path | str, split: str, *, batch_size: int, image_size: int, train: bool,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int | None = None) -> Loader:
    if kind not in KINDS:
        raise ValueError(f"unknown loader '{kind}'; choose from {', '.join(KINDS)}")
    return KINDS[kind](Path(data), split, batch_size=batch_size, image_size=image_size, train=train,
                       device=torch.device(device), dtype=dtype, rank=rank, world_size=world_size, seed=seed,
                       workers=workers)
