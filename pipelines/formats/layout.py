"""Where the converter puts things inside OUT. Readers (loaders, verify) use the same names."""
from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = 1
FORMATS = ("ffcv", "dali")
SPLITS = ("train", "holdout", "val")

MANIFEST = "manifest.json"  # written last: its presence means OUT is complete
REJECTED = "rejected.jsonl"
WORK = ".work"  # resume state of an unfinished run; removed once the manifest is written

# Members of one webdataset sample. `.cls` is the webdataset convention (the class index as ASCII text);
# `.label.i32` holds the same index as one little-endian int32, so DALI can read it as a tensor
# (`dtypes=[..., types.INT32]`) without parsing text.
IMAGE_EXT = "jpg"
CLASS_EXT = "cls"
LABEL_EXT = "label.i32"


def dali_split_dir(out: Path, split: str) -> Path:
    return out / "dali" / split


def staging_split_dir(out: Path, split: str) -> Path:
    """Shards are the converter's unit of work and of resume. When only FFCV is asked for, they are
    written here and deleted once the .beton is built from them."""
    return out / WORK / "shards" / split


def records_dir(out: Path, split: str) -> Path:
    return out / WORK / "records" / split


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(index: int) -> str:
    return f"shard-{index:06d}.idx"


def beton_path(out: Path, split: str) -> Path:
    return out / "ffcv" / f"{split}.beton"


def sample_key(index: int) -> str:
    """A sample's key: its position in the split's planned order. Keys of rejected inputs are skipped,
    so a key always names the same source file for the same source and settings."""
    return f"{index:08d}"
