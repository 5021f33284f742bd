"""Writing an FFCV .beton from the finished shards of a split, without decoding anything again.

FFCV's `RGBImageField.encode` takes pixels and re-encodes them with OpenCV. The shards already hold the
final JPEG of every sample (decoded and checked once, by the converter's workers), so the field used here
stores those bytes as they are, in FFCV's own `jpg` mode, with the width and height it needs for cropping.
The .beton thus holds exactly the bytes of the DALI shards: no second decode, no generation loss.

The field is a plain `RGBImageField` whose `encode` is replaced on the instance. The .beton records the
field's type id, so it must stay an `RGBImageField`: readers decode it with FFCV's stock decoders.

FFCV's writer has two ways to hang, both closed here. A sample larger than a page cannot be stored (its
allocator raises in the worker), so the page is at least the largest stored JPEG, rounded up to a power of two
(a full-size camera image can hold several MiB). And its main process waits, polling a shared counter, for its
workers to have written every sample: a worker that dies (an exception, the OOM killer) leaves it polling
forever, so a watchdog ends the write with an error that names the worker's exit code instead.
"""
from __future__ import annotations

import _thread
import functools
import io
import os
import signal
import threading
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


def page_size(workers: int, image_bytes: int, largest: int) -> int:
    """FFCV's page for a split: SMALL_PAGE for a small split, else LARGE_PAGE, and never smaller than the largest
    sample (FFCV cannot store a sample across pages), as a power of two (FFCV's rule)."""
    base = SMALL_PAGE if image_bytes < 64 * SMALL_PAGE * workers else LARGE_PAGE
    return max(base, 1 << max(0, largest - 1).bit_length())


class WriterFailed(RuntimeError):
    """One of FFCV's writer processes ended without finishing its share; the message names its exit code."""


@contextmanager
def _workers_watched(poll_s: float = 0.5):
    """While FFCV's writer runs in this process (its main thread): its worker processes are recorded as they
    start, and a thread checks their exit codes. One that ended with an error stops the others and interrupts
    the writer's wait with SIGUSR1, whose handler here raises WriterFailed in the writer's thread. Without it the
    writer would poll for the lost samples forever."""
    import ffcv.writer
    started, failed, done = [], [], threading.Event()
    original = ffcv.writer.Process

    class Recorded(original):
        def start(self):
            super().start()
            started.append(self)

    def fail(_signum, _frame):
        codes = ", ".join(f"pid {p.pid} exit code {p.exitcode}" for p in failed)
        raise WriterFailed(f"an FFCV writer process ended before writing its samples ({codes}; its error is above)")

    def watch():
        while not done.wait(poll_s):
            dead = [p for p in list(started) if p.exitcode not in (None, 0)]
            if dead:
                failed.extend(dead)
                for process in started:
                    if process.exitcode is None:
                        process.terminate()
                _thread.interrupt_main(signal.SIGUSR1)  # runs `fail` in the main thread, between its polls
                return
    previous = signal.signal(signal.SIGUSR1, fail)
    ffcv.writer.Process = Recorded
    watcher = threading.Thread(target=watch, name="beton-writer-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        ffcv.writer.Process = original
        signal.signal(signal.SIGUSR1, previous)


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
    largest = int(dataset.reader.rows[:, 2].max()) if len(dataset) else 0
    writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()},
                           page_size=page_size(workers, dataset.reader.image_bytes(), largest), num_workers=workers)
    with _without_ffcv_progress(), _workers_watched():
        writer.from_indexed_dataset(dataset, chunksize=256)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    commit(tmp, beton)
    return len(dataset)
