"""Writing an FFCV .beton from the finished shards of a split, without decoding anything again.

FFCV's `RGBImageField.encode` takes pixels and re-encodes them with OpenCV. The shards already hold the
final JPEG of every sample (decoded and checked once, by the converter's workers), so the field used here
stores those bytes as they are, in FFCV's own `jpg` mode, with the width and height it needs for cropping.
The .beton thus holds exactly the bytes of the DALI shards: no second decode, no generation loss.

The field is a plain `RGBImageField` whose `encode` is replaced on the instance. The .beton records the
field's type id, so it must stay an `RGBImageField`: readers decode it with FFCV's stock decoders.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .files import commit, tmp_path
from .layout import IMAGE_EXT, LABEL_EXT
from .webdataset import read_index

# FFCV allocates storage per worker in pages. 8 MiB (FFCV's default) holds ~100 images at 512 px and keeps
# reads sequential on ImageNet; a small split gets 2 MiB pages (FFCV's minimum), or half-empty 8 MiB pages
# would make up most of its file.
LARGE_PAGE, SMALL_PAGE = 1 << 23, 1 << 21
SAMPLES_PER_WORKER = 4096  # below this, another writer process costs more to start than it saves


class ShardSamples:
    """An indexable dataset over shard members, read with pread; what FFCV's writer workers consume."""

    def __init__(self, shards: list[tuple[Path, Path]]):
        self.tars, rows = [], []
        for tar, index in shards:
            for members in read_index(index):
                by_ext = {m.ext: m for m in members}
                image = by_ext[IMAGE_EXT]
                rows.append((len(self.tars), image.offset, image.size, by_ext[LABEL_EXT].offset))
            self.tars.append(str(tar))
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 4)
        self._fds: dict[int, int] = {}

    def image_bytes(self) -> int:
        return int(self.rows[:, 2].sum())

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getitem__(self, i: int):
        shard, offset, size, label_offset = (int(v) for v in self.rows[i])
        jpeg = self._read(shard, offset, size)
        width, height = Image.open(io.BytesIO(jpeg)).size  # header only
        label = int(np.frombuffer(self._read(shard, label_offset, 4), "<i4")[0])
        return (jpeg, width, height), label


def _store_jpeg(destination, value, malloc) -> None:
    jpeg, width, height = value
    destination["mode"] = 0  # FFCV's IMAGE_MODES["jpg"]
    destination["width"], destination["height"] = width, height
    destination["data_ptr"], storage = malloc(len(jpeg))
    storage[:] = np.frombuffer(jpeg, dtype=np.uint8)


def write_beton(shards: list[tuple[Path, Path]], beton: Path, workers: int) -> int:
    """Write `beton` (via `beton.tmp`, then a rename) from the shards, in shard order. Returns samples."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = ShardSamples(shards)
    image = RGBImageField(write_mode="jpg")
    image.encode = _store_jpeg
    beton.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(beton)
    # FFCV workers append pages in the order they fill them; the samples' table order is fixed, so the
    # samples are the same in every run even though the page layout may differ.
    workers = max(1, min(workers, len(dataset) // SAMPLES_PER_WORKER))
    small = dataset.image_bytes() < 64 * SMALL_PAGE * workers
    writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()},
                           page_size=SMALL_PAGE if small else LARGE_PAGE, num_workers=workers)
    writer.from_indexed_dataset(dataset, chunksize=256)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    commit(tmp, beton)
    return len(dataset)
