"""The split and the order of samples: a pure function of the file list, the fraction and the seed.

- A class's label is the rank of its wnid in the sorted list of train wnids (torchvision and timm do the same).
- `holdout` takes round(fraction × n) images of every class (at least one when the class has two or more,
  and never all of them), disjoint from `train`. Which images is decided by a hash of (seed, wnid, file
  name), so the choice is the same in every source layout and does not move when other classes change.
- `train` is stored in a seeded random order. DALI reads shards sequentially through a shuffle buffer of a
  few thousand samples; in class order, every batch would hold one or two classes.
- `holdout` and `val` are stored in (label, file name) order: evaluation needs no shuffling.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass

from .sources import Location, SourceFile


@dataclass(frozen=True)
class PlannedSample:
    index: int  # position in the split's order; the sample's key in the shards
    ref: str
    location: Location
    label: int


def class_index(train_wnids: list[str]) -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(sorted(train_wnids))}


def holdout_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def _hash_rank(seed: int, f: SourceFile) -> bytes:
    # surrogateescape: a file name that is not valid UTF-8 (allowed on Linux) hashes by its raw bytes
    return hashlib.sha256(f"{seed}/{f.wnid}/{f.name}".encode("utf-8", "surrogateescape")).digest()


def _identity(f: SourceFile) -> tuple:
    return (f.wnid, f.name, f.ref)


def plan_splits(train_files: list[SourceFile], val_files: list[SourceFile] | None,
                train_wnids: list[str], holdout_fraction: float, seed: int) -> dict[str, list[PlannedSample]]:
    labels = class_index(train_wnids)
    by_class: dict[str, list[SourceFile]] = defaultdict(list)
    for f in train_files:
        by_class[f.wnid].append(f)
    train, holdout = [], []
    for wnid in sorted(by_class):
        files = sorted(by_class[wnid], key=lambda f: (_hash_rank(seed, f), _identity(f)))
        k = holdout_count(len(files), holdout_fraction)
        holdout += files[:k]
        train += files[k:]
    train.sort(key=_identity)
    random.Random(seed).shuffle(train)
    holdout.sort(key=lambda f: (labels[f.wnid],) + _identity(f))
    splits = {"train": train, "holdout": holdout}
    if val_files is not None:
        splits["val"] = sorted(val_files, key=lambda f: (labels[f.wnid],) + _identity(f))
    return {name: [PlannedSample(i, f.ref, f.location, labels[f.wnid]) for i, f in enumerate(files)]
            for name, files in splits.items()}
