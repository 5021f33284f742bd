"""The ImageNet-1k wnids and their readable names, from the tables timm ships (no download).

The files are read straight from timm's package folder: importing timm would import torch, which costs
~4 s on the project's 2-core machines, for a 30 kB table.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


def _info_dir() -> Path:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed; it provides the ImageNet class table (pip install timm)")
    return Path(spec.submodule_search_locations[0]) / "data" / "_info"


@lru_cache(maxsize=1)
def imagenet_1k() -> dict[str, str]:
    """{wnid: name} for the 1,000 ILSVRC2012 classes, in sorted wnid order (their label order)."""
    info = _info_dir()
    wnids = (info / "imagenet_synsets.txt").read_text().split()
    names = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines()
                 if "\t" in line)
    return {w: names.get(w, "") for w in sorted(wnids)}
