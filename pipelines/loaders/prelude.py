"""What every loader's build() does first, in the same order, so that they fail alike and count alike.

1. parse the loader's options (an unknown or ill-typed one is a ValueError before any file is read);
2. load the manifest (a missing, unfinished or foreign OUT directory is a DatasetError naming the fix);
3. find the split and the files the loader reads (its webdataset shards or its .beton), and check that each
   exists with the size the manifest recorded (a stat per file: ~10 ms for ImageNet's 1,300 shards);
4. count this rank's samples and batches per epoch under the contract (contract.rank_samples): train drops
   the last partial batch, eval keeps it;
5. resolve `workers` (None: this rank's share of the cores, contract.default_workers).

What differs between loaders stays in their modules: the DALI webdataset reader's own shard split, the
torchvision loader's sampler, FFCV's Loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..contract import batches_per_epoch, default_workers, rank_samples
from ..formats.manifest import beton_file, check_files, dali_shards, load_manifest, split_info

# what a loader reads: its webdataset shards [(tar, index)], its .beton, or nothing (synthetic)
SHARDS, BETON = "shards", "beton"


@dataclass(frozen=True)
class Prelude:
    options: Any  # the loader's parsed options (its parse())
    manifest: dict
    info: dict  # the split's manifest entry
    samples: int  # in the split, all ranks together
    shards: tuple[tuple[Path, Path], ...]  # (tar, index) of each webdataset shard, when the loader reads them
    beton: Path | None  # the split's .beton, when the loader reads it
    per_rank: int  # this rank's samples per epoch (contract.rank_indices)
    batches: int  # this rank's batches per epoch
    workers: int  # `workers`, or this rank's share of the cores when it was None

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]


def prelude(data: Path, split: str, *, parse: Callable[[dict | None], Any], options: dict | None,
            reads: str | None, batch_size: int, train: bool, rank: int, world_size: int,
            workers: int | None) -> Prelude:
    """Steps 1-5 of the module docstring; `reads` is SHARDS, BETON or None."""
    opts = parse(options)
    manifest = load_manifest(data)
    shards, beton = (), None
    if reads == SHARDS:
        shards = tuple(dali_shards(data, manifest, split))
        check_files(data, manifest, [path for pair in shards for path in pair])
    elif reads == BETON:
        beton = beton_file(data, manifest, split)
        check_files(data, manifest, [beton])
    info = split_info(data, manifest, split)
    per_rank = rank_samples(info["samples"], rank=rank, world_size=world_size, train=train)
    return Prelude(options=opts, manifest=manifest, info=info, samples=info["samples"], shards=shards, beton=beton,
                   per_rank=per_rank, batches=batches_per_epoch(per_rank, batch_size, train),
                   workers=default_workers(world_size) if workers is None else workers)
