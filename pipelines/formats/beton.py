"""Writing an FFCV .beton from the finished shards of a split, without decoding anything again.

FFCV's `RGBImageField.encode` takes pixels and re-encodes them with OpenCV. The shards already hold the
final JPEG of every sample (decoded and checked once, by the converter's workers), so the field used here
stores those bytes as they are, in FFCV's own `jpg` mode, with the width and height it needs for cropping.
The .beton thus holds exactly the bytes of the DALI shards: no second decode, no generation loss.

The field is a plain `RGBImageField` whose `encode` is replaced on the instance. The .beton records the
field's type id, so it must stay an `RGBImageField`: readers decode it with FFCV's stock decoders.
"""
from __future__ import annotations

import functools
import io
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .files import commit, tmp_path
from .webdataset import ShardReader

# FFCV allocates storage per worker in pages. 8 MiB (FFCV's default) holds ~100 images at 512 px and keeps
# reads sequential on ImageNet; a small split gets 2 MiB pages (FFCV's minimum), or half-empty 8 MiB pages
# would make up most of its file.
LARGE_PAGE, SMALL_PAGE = 1 << 23, 1 << 21
SAMPLES_PER_WORKER = 4096  # below this, another writer process costs more to start than it saves


class _BetonSamples:
    """What FFCV's writer workers index: ((jpeg, width, height), label), read from the shards."""

    def __init__(self, shards: list[tuple[Path, Path]]):
        self.reader = ShardReader(shards)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        jpeg, label = self.reader.read(i)
        width, height = Image.open(io.BytesIO(jpeg)).size  # header only
        return (jpeg, width, height), label


def _store_jpeg(destination, value, malloc) -> None:
    jpeg, width, height = value
    destination["mode"] = 0  # FFCV's IMAGE_MODES["jpg"]
    destination["width"], destination["height"] = width, height
    destination["data_ptr"], storage = malloc(len(jpeg))
    storage[:] = np.frombuffer(jpeg, dtype=np.uint8)


@contextmanager
def _without_ffcv_progress():
    """FFCV's writer draws its own tqdm bar on stderr (`tqdm(total=...)` in DatasetWriter._write_common), one
    per .beton: the converter writes its splits side by side, so their carriage returns mix into one garbled
    line among the converter's rich output. Its progress has no off switch, so the writer's module name `tqdm`
    is swapped for a disabled tqdm while the writer runs (in the process that writes, and restored after)."""
    import ffcv.writer
    from tqdm import tqdm
    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def write_beton(shards: list[tuple[Path, Path]], beton: Path, workers: int) -> int:
    """Write `beton` (via `beton.tmp`, then a rename) from the shards, in shard order. Returns samples."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = _BetonSamples(shards)
    image = RGBImageField(write_mode="jpg")
    image.encode = _store_jpeg
    beton.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(beton)
    # FFCV workers append pages in the order they fill them; the samples' table order is fixed, so the
    # samples are the same in every run even though the page layout may differ.
    workers = max(1, min(workers, len(dataset) // SAMPLES_PER_WORKER))
    small = dataset.reader.image_bytes() < 64 * SMALL_PAGE * workers
    writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()},
                           page_size=SMALL_PAGE if small else LARGE_PAGE, num_workers=workers)
    with _without_ffcv_progress():
        writer.from_indexed_dataset(dataset, chunksize=256)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    commit(tmp, beton)
    return len(dataset)
