"""OUT/manifest.json: what a converted dataset holds. It is written last; loaders trust nothing without it."""
from __future__ import annotations

import json
from pathlib import Path

from .layout import FORMAT_VERSION, MANIFEST


class DatasetError(Exception):
    """A converted dataset is missing, incomplete or damaged; the message names the file and the fix."""


RESUME = "re-run tools/convert_imagenet.py with the same arguments: it resumes"
RECONVERT = "convert again (tools/convert_imagenet.py SRC OUT --overwrite), then run tools/verify_dataset.py OUT"


def load_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not Path(out).is_dir():
        raise DatasetError(f"{out}: no such directory; pass the OUT directory of tools/convert_imagenet.py")
    if not path.is_file():
        if (Path(out) / ".work").exists():
            raise DatasetError(f"{out} holds an unfinished conversion (no {MANIFEST} yet); {RESUME}")
        raise DatasetError(f"{out} is not a converted dataset: it has no {MANIFEST}; convert it first with "
                           "tools/convert_imagenet.py SRC OUT")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable ({e}); {RECONVERT}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {version}, this code reads {FORMAT_VERSION}; "
                           "convert again with this version of tools/convert_imagenet.py")
    return manifest


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()


def split_info(out: Path, manifest: dict, split: str) -> dict:
    """A split's entry, or a DatasetError naming the splits there are."""
    if split not in manifest["splits"]:
        raise DatasetError(f"{Path(out) / MANIFEST}: no split '{split}' (it has {sorted(manifest['splits'])}); "
                           "'val' exists only when the source has the official validation set")
    return manifest["splits"][split]


def largest_side(out: Path, manifest: dict, split: str) -> int | None:
    """The longest side, in pixels, of any image stored in the split (0 when it holds none), for a decoder that
    preallocates its buffers. None for a manifest written before the converter recorded it: the loader then
    falls back to its own default rather than refuse a sound dataset."""
    return split_info(out, manifest, split).get("largest_side")


def dali_shards(out: Path, manifest: dict, split: str) -> list[tuple[Path, Path]]:
    """[(tar, index)] of a split's webdataset shards."""
    info = split_info(out, manifest, split)
    if "dali" not in info:
        raise DatasetError(f"{out} was converted without the webdataset shards; convert again with "
                           "--formats ffcv,dali (or --formats dali)")
    directory = Path(out) / info["dali"]["dir"]
    return [(directory / tar, directory / index) for tar, index in info["dali"]["shards"]]


def beton_file(out: Path, manifest: dict, split: str) -> Path:
    """A split's .beton, or a DatasetError naming the converter flag that writes it."""
    info = split_info(out, manifest, split)
    if not info.get("ffcv"):
        raise DatasetError(f"{out} was converted without the .beton files; convert again with "
                           "--formats ffcv,dali (or --formats ffcv)")
    return Path(out) / info["ffcv"]


def check_files(out: Path, manifest: dict, paths: list[Path]) -> None:
    """Each file exists with the size the manifest recorded: a stat per file, cheap enough for every loader
    start (1,300 ImageNet shards take ~10 ms). A truncated or missing file is a DatasetError naming it;
    damage that keeps the size shows up at read time, and tools/verify_dataset.py checks the sha256s."""
    recorded = manifest.get("files", {})
    for path in paths:
        name = Path(path).relative_to(out).as_posix()
        expected = recorded.get(name, {}).get("bytes")
        try:
            size = Path(path).stat().st_size
        except OSError as e:
            raise DatasetError(f"{path}: missing or unreadable ({e.strerror}); {RECONVERT}") from None
        if expected is not None and size != expected:
            raise DatasetError(f"{path}: {size:,} bytes, the manifest says {expected:,} (truncated or replaced); "
                               f"{RECONVERT}")
