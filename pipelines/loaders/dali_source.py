"""What the `dali` loader feeds its graph, batch by batch, when it reads by index (DaliOptions.reader "index",
the default): the JPEG bytes and labels of the contract's per-epoch order (contract.rank_indices, the order every
other loader reads), and every random draw of the augmentation, made on the host from (seed, epoch, rank, batch):
the crop window and the flip; for two views, the colour and blur; with a RandAugment, each layer's operation
(or "not applied"), magnitude bin and sign (rand_augment_draws); with a Ramp, the epoch's output side. One
generator per batch draws them in that order, so turning RandAugment or the ramp on leaves the crops and flips
as they were.

A batch is therefore a pure function of its position in the run (epoch x batches per epoch + batch), which is
what makes the loader seekable: a pipeline built at any position yields what an uninterrupted one yields there,
and one pipeline can run on across epoch boundaries (its prefetch fills the next epoch's first batches while
the last ones of this epoch train), since nothing carries over from one epoch to the next. The webdataset
reader has neither property: its shuffle buffer's state depends on everything read before.

Cost on the host, per sample: one pread (the JPEG, its class and label members are adjacent in the tar: one read
covers all three), a JPEG header parse the first time a sample is seen (its size, kept for later epochs; the
crop needs it), and a share of the batch's vectorized draws.

Where that cost is paid: DALI calls its external source from the iterator's next(), on the thread that trains,
for the batch `prefetch_queue_depth` ahead. With `ahead` > 0 (DaliOptions.feed_ahead) the source only hands over
a batch that a pool of `ahead` threads (FeedAhead) made while the trainer worked, and has them start the next
ones: the preads (os.pread releases the GIL, so a page-cache miss stalls a pool thread, not training) and the
draws run off the training thread. Threads rather than DALI's parallel external source (worker processes): the
pool starts once with the source and serves every pipeline built on it, so a seek costs no process start; it
shares the process's memory instead of one interpreter per worker that imports torch; and it needs no fork,
which a process that has initialized CUDA must not do. What stays on the GIL is the Python share of each read
and draw, which the threads interleave with training (benchmarks/dali_feed.py measures both ways).
"""
from __future__ import annotations

import io
import os
import resource
import struct
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..contract import (CROP_RATIO, CROP_SCALE, RAND_AUGMENT_MAX, RAND_AUGMENT_OPS, RAND_AUGMENT_P, TWO_VIEWS,
                       RandAugment, Ramp, rank_indices)
from ..formats.manifest import RECONVERT, DatasetError
from ..formats.webdataset import ShardReader

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop: draws before it falls back to a center crop


def random_resized_crops(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray,
                         scale=CROP_SCALE, ratio=CROP_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for a batch at once: n x (x, y, w, h) in pixels. Up to 10
    draws of an area share in `scale` and a log-uniform aspect ratio in `ratio`; the first that fits the image
    is kept, else the whole image clamped to the ratio range, centred."""
    n = len(widths)
    w_img, h_img = widths[:, None].astype(np.float64), heights[:, None].astype(np.float64)
    area = w_img * h_img * rng.uniform(scale[0], scale[1], (n, CROP_ATTEMPTS))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, CROP_ATTEMPTS)))
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    # the fallback (no draw fits): the whole image, narrowed to the nearest allowed aspect ratio
    w_img, h_img = w_img[:, 0], h_img[:, 0]
    in_ratio = w_img / h_img
    fw = np.where(in_ratio < ratio[0], w_img, np.where(in_ratio > ratio[1], np.round(h_img * ratio[1]), w_img))
    fh = np.where(in_ratio < ratio[0], np.round(w_img / ratio[0]), h_img)
    found = fits.any(axis=1)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    position = rng.random((n, 2))
    x = np.where(found, np.floor(position[:, 0] * (w_img - w + 1)), (w_img - w) // 2)
    y = np.where(found, np.floor(position[:, 1] * (h_img - h + 1)), (h_img - h) // 2)
    return np.stack([x, y, w, h], axis=1).astype(np.float32)


def simclr_colour(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The colour draws of one SimCLR view per sample (contract.TWO_VIEWS), as DALI's color_twist and
    gaussian_blur take them: factors of 1 and a hue of 0 where the jitter's coin says no, saturation 0 for
    grayscale. DALI's hue is in degrees, torchvision's in turns (0.1 = 36 degrees)."""
    jitter = rng.random(n) < TWO_VIEWS.jitter_p

    def factor(strength: float) -> np.ndarray:  # torchvision's ColorJitter: uniform in [1 - s, 1 + s]
        return np.where(jitter, rng.uniform(1 - strength, 1 + strength, n), 1.0).astype(np.float32)
    brightness, contrast = factor(TWO_VIEWS.brightness), factor(TWO_VIEWS.contrast)
    saturation = factor(TWO_VIEWS.saturation)
    hue = np.where(jitter, rng.uniform(-360 * TWO_VIEWS.hue, 360 * TWO_VIEWS.hue, n), 0.0).astype(np.float32)
    gray = rng.random(n) < TWO_VIEWS.gray_p
    return {"brightness": brightness, "contrast": contrast, "saturation": np.where(gray, 0, saturation)
            .astype(np.float32), "hue": hue, "blur": rng.random(n) < TWO_VIEWS.blur_p,
            "sigma": rng.uniform(*TWO_VIEWS.blur_sigma, n).astype(np.float32)}


# RandAugment on DALI's magnitude scale (nvidia.dali.auto_aug): 31 bins, bin b standing for timm's magnitude
# b / 3 (of 10), so m 9 is bin 27 and a std of 0.5 is 1.5 bins. Rounding a drawn magnitude to its bin moves it by
# at most 1/6 (1.7 % of the range).
MAGNITUDE_BINS = 31
NOT_APPLIED = len(RAND_AUGMENT_OPS)  # the graph's operation index after timm's 15: the identity


def rand_augment_draws(rng: np.random.Generator, n: int, spec: RandAugment) -> np.ndarray:
    """timm's RandAugment draws for n samples (contract.RandAugment): n x layers x (operation, magnitude bin,
    sign) int32. Per sample and layer: an operation uniform over RAND_AUGMENT_OPS (with replacement), replaced by
    NOT_APPLIED with p 1 - RAND_AUGMENT_P (timm's per-operation coin), a magnitude from N(m, std) clipped to
    [0, 10] and rounded to its bin, and a sign (1: negated, as DALI's signed_bin encodes it) that only the
    signed operations read."""
    shape = (n, spec.ops)
    op = rng.integers(0, len(RAND_AUGMENT_OPS), shape)
    applied = rng.random(shape) < RAND_AUGMENT_P
    magnitude = np.clip(rng.normal(spec.magnitude, spec.std, shape), 0, RAND_AUGMENT_MAX)
    bins = np.floor(magnitude * ((MAGNITUDE_BINS - 1) / RAND_AUGMENT_MAX) + 0.5)  # halves up, as DALI's cast
    sign = rng.integers(0, 2, shape)
    return np.stack([np.where(applied, op, NOT_APPLIED), bins, sign], axis=-1).astype(np.int32)


# Start-of-frame markers (baseline, progressive, ...): all of 0xC0-0xCF but DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, by walking the marker segments from SOI: ~5 us a file,
    against ~100-250 us for PIL's Image.open on this 2-core CPU (a first epoch parses every header). None when
    the walk does not reach a frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    at, end = 2, len(data) - 9
    while at < end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return (width, height) if width and height else None
        if marker == 0xD9 or marker == 0xDA:  # end of image, or scan data before any frame header
            return None
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


# The per-sample outputs of IndexedSource, in order, for each kind of graph.
TRAIN_OUTPUTS = ("jpegs", "labels", "crop_start", "crop_shape", "mirror")  # + "size" (ramp), "rand_augment"
EVAL_OUTPUTS = ("jpegs", "labels")
VIEW_OUTPUTS = ("roi_start", "roi_end", "mirror", "brightness", "contrast", "saturation", "hue", "blur", "sigma")
TWO_VIEW_OUTPUTS = ("jpegs", "labels") + tuple(f"{name}{v}" for v in range(2) for name in VIEW_OUTPUTS)


@dataclass(frozen=True)
class Plan:
    """Where a pipeline starts and how positions map to samples: position p is batch p % batches of epoch
    p // batches (eval: every epoch reads the same order, so only the batch matters)."""
    samples: int  # in the split
    batch_size: int
    batches: int  # per epoch, this rank
    train: bool
    seed: int
    rank: int
    world_size: int


class ShardFiles:
    """pread access to the shards for any number of threads. Each thread keeps descriptors of its own (at most
    `per_thread`, the least recently used closed first), so that no thread closes a descriptor another one is
    reading from; formats.files.pread_exact shares one table and is for one thread at a time. The source takes an
    eighth of the process's open-file limit: ImageNet has ~1,300 shards and a usual limit is 1,024."""

    def __init__(self, tars: list[str], threads: int):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        budget = len(tars) * threads if soft == resource.RLIM_INFINITY else max(64, soft // 8)
        self.tars, self.per_thread = tars, max(8, min(len(tars), budget // max(1, threads)))
        self._local, self._tables = threading.local(), []
        # Closed when the source goes: no thread can be reading then, since a running read holds the source.
        weakref.finalize(self, _close_all, self._tables)

    def pread(self, shard: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of shard `shard`; OSError for a short read (a truncated file)."""
        table = getattr(self._local, "fds", None)
        if table is None:
            table = self._local.fds = {}
            self._tables.append(table)
        fd = table.pop(shard, None)
        if fd is None:
            if len(table) >= self.per_thread:
                os.close(table.pop(next(iter(table))))
            fd = os.open(self.tars[shard], os.O_RDONLY)
        table[shard] = fd  # (re)inserted last: dicts keep insertion order
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.tars[shard]} ends inside a member ({len(data)} of {size} bytes at offset "
                          f"{offset}); the file is truncated")
        return data


def _close_all(tables: list[dict]) -> None:
    for table in tables:
        while table:
            os.close(table.popitem()[1])


class EpochOrders:
    """This rank's sample order of each epoch (contract.rank_indices), drawn once for all the threads that ask:
    a permutation of ImageNet's train set takes a good part of a second, so two threads starting an epoch must not
    both draw it, and the threads still reading the previous epoch must not wait for it. Keeps two epochs."""

    def __init__(self, plan: Plan):
        self.plan, self._lock, self._orders = plan, threading.Lock(), {}

    def __call__(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._orders.get(epoch)
            draw = order is None
            if draw:
                order = self._orders[epoch] = Future()
                while len(self._orders) > 2:
                    del self._orders[next(iter(self._orders))]
        if draw:
            plan = self.plan
            try:
                order.set_result(rank_indices(plan.samples, rank=plan.rank, world_size=plan.world_size,
                                              train=plan.train, seed=plan.seed, epoch=epoch))
            except BaseException as e:
                order.set_exception(e)
                with self._lock:
                    self._orders.pop(epoch, None)
        return order.result()


class FeedAhead:
    """Runs make(position) for the `ahead` positions after each one asked for, on `ahead` threads, so that the
    thread asking (DALI's, inside next(): the thread that trains) finds its batch made. A pipeline asks for
    consecutive positions; one built elsewhere (a seek) asks for a position that was not read ahead: what was is
    dropped and the same threads go on from there, so a seek costs no more than a start. An exception raised by
    make(position) is raised when that position is asked for."""

    def __init__(self, ahead: int):
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(ahead, thread_name_prefix="dali-feed-ahead")
        self._pending: dict[int, Future] = {}
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def __call__(self, position: int, make: Callable[[int], tuple]) -> tuple:
        # `make` comes with each call rather than once: a stored bound method would make the source and this
        # object a reference cycle, and the threads would outlive the loader until a garbage collection
        wanted = range(position, position + self.ahead + 1)
        for stale in [p for p in self._pending if p not in wanted]:
            self._pending.pop(stale).cancel()
        for p in wanted:  # in order: the pool takes its queue first in, first out
            if p not in self._pending:
                self._pending[p] = self._pool.submit(make, p)
        return self._pending.pop(position).result()


class IndexedSource:
    """DALI's external source (batch mode, batch_info=True): BatchInfo.iteration i is position start + i, where
    `start` is set by the loader before it builds a pipeline on this source. Called from the thread that runs
    the pipeline, in order; it never ends (the loader counts the batches). One source serves every pipeline the
    loader builds, so the index is parsed once, the image sizes it has seen are kept and its read-ahead threads
    start once.

    `ahead` (DaliOptions.feed_ahead): batches made ahead on that many threads (FeedAhead); 0 makes each batch when
    DALI asks for it, on the thread that calls the pipeline. Either way batch(position) is a pure function of the
    position, so both yield the same batches.

    Train, views=1: with a `ramp`, output "size" holds the epoch's side per sample, [side, side] (fn.resize's
    `size`), so the running pipeline changes resolution at an epoch boundary; with `rand_augment`, output
    "rand_augment" holds rand_augment_draws' layers x 3 per sample."""

    def __init__(self, shards: list[tuple[Path, Path]], plan: Plan, *, views: int,
                 rand_augment: RandAugment | None = None, ramp: Ramp | None = None, ahead: int = 0):
        if (rand_augment is not None or ramp is not None) and (views != 1 or not plan.train):
            raise ValueError("rand_augment and ramp are for train pipelines with views=1")
        if ahead < 0:
            raise ValueError(f"ahead must be 0 (on the calling thread) or more batches, got {ahead}")
        self.reader = ShardReader(shards)
        self.files = ShardFiles(self.reader.tars, threads=max(1, ahead))
        self.plan, self.views, self.start = plan, views, 0
        self.rand_augment, self.ramp = rand_augment, ramp
        self.outputs = TWO_VIEW_OUTPUTS if views == 2 else TRAIN_OUTPUTS if plan.train else EVAL_OUTPUTS
        self.outputs += ("size",) * (ramp is not None) + ("rand_augment",) * (rand_augment is not None)
        # (width, height), -1: not seen yet. Threads may write a row at once: the same values.
        self.sizes = np.full((len(self.reader), 2), -1, dtype=np.int64)
        self.orders = EpochOrders(plan)
        self.feed_ahead = FeedAhead(ahead) if ahead else None

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, batch) of a position; eval reads one order every epoch, so its epoch is always 0."""
        batches = self.plan.batches
        return (position // batches, position % batches) if self.plan.train else (0, position % batches)

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        size = self.plan.batch_size
        return self.orders(epoch)[batch * size:(batch + 1) * size]

    def read(self, i: int) -> tuple[np.ndarray, int]:
        """Sample i's JPEG bytes and label, in one pread: the label member follows the JPEG in the tar."""
        shard, offset, size, label_offset = (int(v) for v in self.reader.rows[i])
        try:
            blob = self.files.pread(shard, offset, label_offset + 4 - offset)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.reader.where(i)}: {e}; {RECONVERT}") from None
        return np.frombuffer(blob, dtype=np.uint8, count=size), struct.unpack_from("<i", blob, label_offset - offset)[0]

    def size(self, i: int, jpeg: np.ndarray) -> np.ndarray:
        if self.sizes[i, 0] < 0:
            size = jpeg_size(jpeg.data)
            if size is None:  # a header the marker walk does not follow: PIL's parser decides
                try:
                    size = Image.open(io.BytesIO(jpeg.tobytes())).size  # the header only
                except (OSError, UnidentifiedImageError) as e:
                    raise DatasetError(f"{self.reader.where(i)}: not a readable JPEG ({e}); {RECONVERT}") from None
            self.sizes[i] = size
        return self.sizes[i]

    def undecodable(self, position: int) -> list[str]:
        """The samples of the batch at `position` that PIL cannot decode either, each as reader.where() names it
        with PIL's reason: what a decoder error in that batch is blamed on. A full decode per sample, for the
        error path only."""
        found = []
        for i in (int(i) for i in self.indices(*self.locate(position))):
            try:
                jpeg, _ = self.read(i)
                with Image.open(io.BytesIO(jpeg.tobytes())) as image:
                    image.load()
            except DatasetError as e:  # a read that failed names the file itself
                found.append(str(e))
            except UnidentifiedImageError:
                found.append(f"{self.reader.where(i)}: PIL does not recognize it as an image")
            except Exception as e:  # whatever else PIL's decoder raises for bytes it cannot take
                found.append(f"{self.reader.where(i)}: {e}")
        return found

    def __call__(self, info) -> tuple:
        position = self.start + info.iteration
        return self.feed_ahead(position, self.batch) if self.feed_ahead else self.batch(position)

    def batch(self, position: int) -> tuple:
        """The outputs of the batch at `position`, in self.outputs' order. Safe to call from several threads."""
        plan = self.plan
        epoch, batch = self.locate(position)
        indices = self.indices(epoch, batch)
        jpegs, labels = zip(*(self.read(int(i)) for i in indices))
        out = {"jpegs": list(jpegs), "labels": np.array(labels, dtype=np.int32).reshape(-1, 1)}
        if plan.train:
            sizes = np.stack([self.size(int(i), jpeg) for i, jpeg in zip(indices, jpegs)])
            rng = np.random.default_rng([plan.seed, epoch, plan.rank, batch])
            for view in range(self.views):
                crops = random_resized_crops(rng, sizes[:, 0], sizes[:, 1])
                mirror = (rng.random(len(indices)) < TWO_VIEWS.flip_p).astype(np.int32)
                if self.views == 1:
                    out |= {"crop_start": crops[:, :2].astype(np.int32), "crop_shape": crops[:, 2:].astype(np.int32),
                            "mirror": mirror}
                    if self.ramp is not None:
                        out["size"] = np.full((len(indices), 2), self.ramp.size(epoch), dtype=np.float32)
                    if self.rand_augment is not None:  # drawn after the crops and flips, which stay as without it
                        out["rand_augment"] = rand_augment_draws(rng, len(indices), self.rand_augment)
                    continue
                y_x = crops[:, [1, 0]]  # fn.resize's ROI follows the tensor's shape order: (y, x)
                colour = simclr_colour(rng, len(indices))
                out |= {f"{name}{view}": value for name, value in
                        {"roi_start": y_x, "roi_end": y_x + crops[:, [3, 2]], "mirror": mirror, **colour}.items()}
        return tuple(out[name] if name == "jpegs" else np.ascontiguousarray(out[name]) for name in self.outputs)
