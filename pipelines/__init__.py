"""Input pipelines behind one contract (pipelines/contract.py): `build_loader(kind, ...)`.

Kinds (KINDS, each a module of pipelines/loaders/): `dali` (decode and augment on the GPU), `ffcv` (libjpeg-turbo
on CPU threads, normalize on the GPU), `torchvision` (the baseline a user would write) and `synthetic` (the upper
bound). `options` holds a kind's speed knobs (docs/loaders.md, "Speed knobs"); an unknown one is an error.
`views=2` yields two augmented views per sample for self-supervised pre-training (contract.py).
`pipelines.convert` is the conversion job; `pipelines.formats` holds the on-disk formats it writes and the
loaders read.

Imports are lazy: the converter's tools import `pipelines.formats`, and importing torch here would add ~5 s
to each of their starts (and to each worker process).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .contract import Loader, RandAugment, Ramp

# kind -> its module in pipelines/loaders/
KINDS = {kind: f"{__name__}.loaders.{kind}" for kind in ("dali", "ffcv", "torchvision", "synthetic")}


def check_options(kind: str, options: dict | None) -> None:
    """Raises ValueError for a loader kind or option that does not exist or has the wrong type, and
    LoaderUnavailable when the kind's library is missing: checked before a run starts, not when it builds loaders."""
    if kind not in KINDS:
        raise ValueError(f"unknown loader '{kind}'; choose from {', '.join(KINDS)}")
    importlib.import_module(KINDS[kind]).parse(options)


def build_loader(kind: str, data: Path | str, split: str, *, batch_size: int, image_size: int, train: bool,
                 device: torch.device | str, dtype: torch.dtype | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int | None = None,
                 options: dict | None = None, views: int = 1, rand_augment: RandAugment | None = None,
                 ramp: Ramp | None = None) -> Loader:
    """rand_augment and ramp are for train loaders (contract.py); an eval loader reads at image_size."""
    if kind not in KINDS:
        raise ValueError(f"unknown loader '{kind}'; choose from {', '.join(KINDS)}")
    import torch

    from .contract import check_views
    check_views(views, train)
    if not train and (rand_augment is not None or ramp is not None):
        raise ValueError("rand_augment and ramp are for train loaders; eval reads image_size center crops")
    if views == 2 and (rand_augment is not None or ramp is not None):
        raise ValueError("rand_augment and ramp are for views=1: the two-view loaders apply SimCLR's augmentation "
                         "at image_size")
    module = importlib.import_module(KINDS[kind])
    return module.build(Path(data), split, batch_size=batch_size, image_size=image_size, train=train,
                        device=torch.device(device), dtype=dtype or torch.float32, rank=rank,
                        world_size=world_size, seed=seed, workers=workers, options=options,
                        views=views, rand_augment=rand_augment, ramp=ramp)
