"""The `dali` loader: the pipelines of loaders/dali_graph.py behind the loader contract.

DALI returns HWC batches; `permute(0, 3, 1, 2)` turns them into NCHW tensors that are channels_last with no
copy. For bf16 DALI emits fp16 (half the bytes of fp32; DALI has no bf16) and torch converts it on the GPU. On a
GPU every batch is copied out of DALI's buffers into tensors torch owns (Handoff), so the trainer never holds
DALI's memory.

Reader "index" (the default): one pipeline runs on from epoch to epoch. Its external source
(dali_source.IndexedSource) makes each batch a function of its position alone, so the pipeline's prefetch fills
the next epoch's first batches while this epoch's last ones train (an epoch start costs no more than a batch),
and `set_epoch(epoch, start_batch)` that is not the continuation builds a new pipeline at that position (a resume
at 90 % of an ImageNet epoch starts as fast as one at 0). Its host work (reads, draws) runs on `feed_ahead`
threads of the source, ahead of the pipeline, not on the thread that trains. Eval reads rank, rank + world_size,
... in stored order; its last batch is smaller, so every sample counts exactly once across ranks.

Reader "webdataset": each train epoch gets a fresh pipeline that reads shard (rank + epoch) % world_size; its
shuffle buffer is seeded with (seed, epoch), the augmentation's random operators with (seed, epoch, rank), so
ranks draw differently and every draw is reproducible. A pipeline that ran on would let its shuffle buffer carry
samples across the epoch boundary, so an epoch would depend on the ones before it. That reader cannot seek: a
start_batch is reached by reading the batches before it. Eval reads shards that stick to their rank and pads the
last batch; the iterator drops the padding; one pipeline serves every evaluation.

Train, views=1: `rand_augment` adds RandAugment to the graph (dali_graph._rand_augment), built with DALI's
conditionals, which only these graphs turn on; `ramp` sets epoch e's side to ramp.size(e): through the index
reader's source, per sample, on the running pipeline (no rebuild at an epoch start: DALIGenericIterator takes the
new shape as it comes); for the webdataset reader, in the epoch's fresh pipeline. Eval reads image_size.

Errors (dali_errors): a data fault names the file and says to convert again; the device out of memory says what to
lower; anything else is raised as it was.
"""
from __future__ import annotations

import collections
import itertools
import re
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..contract import RandAugment, Ramp, batches_per_epoch, check_start_batch, parse_options, require, train_size
from ..formats.manifest import RECONVERT, DatasetError, largest_side
from .errors import is_out_of_memory, out_of_memory
from .prelude import SHARDS, Prelude, prelude

# ImageNet's largest JPEG is about 6,000 px on a side; DALI's ResNet-50 example pre-sizes for 5,980 x 6,430.
FULL_SIZE_SIDE = 6430
READERS = ("index", "webdataset")
# Batches whose DALI outputs Handoff keeps while the device has not yet run their copies; the host waits only
# beyond that, when the device lags this many batches behind it.
HELD_BATCHES = 8


def dali_seed(*keys: int) -> int:
    """A DALI seed (31 bits) from integer keys, e.g. (seed, epoch) or (seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] & 0x7FFFFFFF)


def shard_size(samples: int, shard_id: int, num_shards: int) -> int:
    """Samples DALI's reader gives shard `shard_id` of `num_shards` (contiguous, sizes differ by at most one)."""
    return samples * (shard_id + 1) // num_shards - samples * shard_id // num_shards


class Handoff:
    """Hands DALI's outputs to torch so that no buffer of DALI's is freed or reused while something still reads it.

    DALI 2.4's default (dynamic) executor gives DALIGenericIterator DLPack views of DALI's own output buffers, and
    a view lets go of its buffer as soon as Python drops it, whatever the device has still queued on it. So on a
    GPU each output is copied into a tensor torch owns, on the stream current at next() (the trainer's, where
    torch's allocator orders that tensor's reuse), and DALI's outputs are kept here with an event recorded after
    those copies, released only once the event has completed. That holds whatever the stream lags behind: the
    copies are the last readers of DALI's buffers, and the buffers outlive them. No host-device sync per batch:
    completed events are found with query(), which never waits; the host waits (Event.synchronize, which torch's
    sync debug mode does not count) only for a batch HELD_BATCHES behind, to bound the memory held.

    On the CPU there is no queue: a tensor that views DALI's buffer keeps it alive (the DLPack reference), so the
    view is handed over as it is (copied only for a dtype conversion)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._held: collections.deque = collections.deque()  # (event, DALI's outputs), oldest first

    def images(self, hwc: torch.Tensor) -> torch.Tensor:
        """B x H x W x C from DALI -> B x C x H x W channels_last in the loader's dtype."""
        nchw = hwc.permute(0, 3, 1, 2)  # channels_last already: a view
        return nchw.to(self.dtype, copy=nchw.is_cuda)  # preserve_format: a dense copy keeps the strides

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.squeeze(1).to(torch.int64, copy=True)

    def keep(self, outputs: dict) -> None:
        """Call once the copies out of `outputs` (DALI's tensors of one batch) are queued on the current stream."""
        device = next((t.device for t in outputs.values() if t.is_cuda), None)
        if device is None:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))  # the stream the copies went to: their device's current one
        self._held.append((event, outputs))
        while self._held and self._held[0][0].query():
            self._held.popleft()
        if len(self._held) > HELD_BATCHES:
            self._held[0][0].synchronize()
            self._held.popleft()

    def clear(self) -> None:
        """Waits for the copies of every batch held (long done, as a rule) and lets DALI's outputs go: before the
        pipeline that made them goes away."""
        while self._held:
            self._held[0][0].synchronize()
            self._held.popleft()


class DaliLoader:
    """`make_pipeline(at)` builds a pipeline: at a position (epoch x batches + batch; eval: the batch) for the
    index reader, for an epoch for the webdataset reader (`seekable` False). `knobs` names the settings that hold
    memory, for an out-of-memory error; `undecodable(position)` (index reader) names the samples of the batch at
    a position that do not decode, for a decoder error."""

    def __init__(self, make_pipeline: Callable[[int], object], *, batches: int, train: bool, dtype: torch.dtype,
                 where: str, knobs: str, views: int = 1, seekable: bool = True,
                 undecodable: Callable[[int], list[str]] | None = None):
        self.make_pipeline, self.batches, self.train, self.seekable = make_pipeline, batches, train, seekable
        self.image_outputs = ["images"] if views == 1 else [f"view{v}" for v in range(views)]  # pipeline outputs
        self.dtype, self.where, self.knobs, self.undecodable = dtype, where, knobs, undecodable
        self.epoch = self.start_batch = 0
        self.handoff = Handoff(dtype)
        # before the pipeline goes with the loader: weakref callbacks run before an object's attributes are released
        weakref.finalize(self, self.handoff.clear)
        self._iterator = None
        self._next = None  # the position the running pipeline yields next (None: no usable pipeline)

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, check_start_batch(start_batch, self.batches)

    def _errors(self, position: int | None):
        """dali_errors for the batch at `position` (None: the webdataset reader, which cannot tell)."""
        culprits = None
        if self.undecodable is not None and position is not None:
            culprits = lambda: self.undecodable(position)  # noqa: E731
        return dali_errors(self.where, self.knobs, culprits)

    def _start(self, at: int):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from .dali_graph import READER
        self.handoff.clear()
        self._iterator = None  # frees the previous pipeline's buffers first
        with self._errors(at if self.seekable else None):
            if self.seekable:  # an endless source: the iterator never ends an epoch, this wrapper counts
                self._iterator = DALIGenericIterator(self.make_pipeline(at), [*self.image_outputs, "labels"])
            else:
                self._iterator = DALIGenericIterator(
                    self.make_pipeline(at), [*self.image_outputs, "labels"], reader_name=READER,
                    last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)

    def _batch(self, out: dict):
        handoff = self.handoff
        images = tuple(handoff.images(out[name]) for name in self.image_outputs)
        labels = handoff.labels(out["labels"])
        handoff.keep(out)  # after the copies that read DALI's buffers were queued
        return images[0] if len(images) == 1 else images, labels

    def __iter__(self):
        if self.start_batch == self.batches:  # nothing left (or this rank's share is smaller than a batch)
            return
        yield from (self._indexed() if self.seekable else self._sequential())

    def _indexed(self):
        wanted = (self.epoch * self.batches if self.train else 0) + self.start_batch
        # eval repeats one order: any position with the same batch in the epoch continues it
        running = self._next is not None and (self._next == wanted if self.train else
                                              self._next % self.batches == wanted)
        if not running:
            self._next = None
            self._start(wanted)
            self._next = wanted
        for _ in range(self.start_batch, self.batches):
            at = self._next
            try:
                with self._errors(at):
                    (out,) = next(self._iterator)
                    batch = self._batch(out)
            except BaseException:
                self._next = None  # the pipeline's state is unknown: the next iteration builds a new one
                raise
            self._next += 1
            yield batch

    def _sequential(self):
        # Train: a fresh pipeline per epoch (module docstring). Eval has no randomness: one pipeline serves every
        # evaluation, unless the last one was left mid-epoch.
        if self.train or self._next != 0:
            self._start(self.epoch if self.train else 0)
        iterator, self._next = self._iterator, None
        for step in itertools.count():
            with self._errors(None):
                try:
                    (out,) = next(iterator)
                except StopIteration:
                    break
                if step >= self.batches:  # a rank whose shard is one sample longer: skip its extra batch
                    continue
                if step < self.start_batch:  # this reader cannot seek: the batches before are read and dropped
                    continue
                batch = self._batch(out)
            yield batch
        iterator.reset()
        self._next = 0


# DALI names the operator that failed: its decoders and its reader fail on the data they were given.
_OPERATOR = re.compile(r"Error in (?:CPU|GPU|MIXED|Mixed) operator `([^`]+)`")
_DATA_OPERATORS = re.compile(r"\.(?:decoders|readers)\.")


@contextmanager
def dali_errors(where: str, knobs: str, undecodable: Callable[[], list[str]] | None = None):
    """What an error while building or running DALI's pipeline means for the user (loaders/errors.py):
    - out of memory (on the device, in pinned host memory): a DeviceOutOfMemory naming `knobs`, the loader's
      settings that hold memory;
    - an error of DALI's decoder or reader (a JPEG that does not decode, an index that does not match its tar):
      a DatasetError naming the files and RECONVERT. `undecodable()`, when given (the index reader, which knows
      the samples of the failed batch), names the samples PIL cannot decode either; if it finds none, the data
      may be fine, and DALI's error is raised as it was, with a note that says so;
    - anything else is raised as it was, with its own message and traceback."""
    try:
        yield
    except Exception as error:
        if is_out_of_memory(error):
            raise out_of_memory(where, error, knobs) from error
        operator = _OPERATOR.search(str(error)) if isinstance(error, RuntimeError) else None
        if operator is None or not _DATA_OPERATORS.search(operator.group(1)):
            raise
        reason = dali_reason(str(error))
        if undecodable is None:
            raise DatasetError(f"DALI could not read {where}: {reason}\n  {RECONVERT}") from error
        culprits = undecodable()
        if not culprits:
            error.add_note(f"While reading {where}: PIL decodes every sample of the failed batch, so the data may be "
                           f"fine; tools/verify_dataset.py checks every file against its checksum.")
            raise
        raise DatasetError(f"DALI could not read {where}: {reason}\n  samples that do not decode:\n    " +
                           "\n    ".join(culprits) + f"\n  {RECONVERT}") from error


def dali_reason(message: str) -> str:
    """The operator and the cause out of DALI's error text, without its Python traceback and C++ context."""
    operator = _OPERATOR.search(message)
    cause = message.split("encountered:", 1)[-1]
    cause = re.split(r"\nC\+\+ context|\nCurrent pipeline object", cause)[0].strip()
    cause = cause if len(cause) <= 300 else cause[:300] + "..."
    return f"{operator.group(1)}: {cause}" if operator else cause


def parse(options: dict | None):
    """The DaliOptions of `options`; ValueError for an unknown or ill-typed one, for one that the chosen reader
    does not read (dali_graph.READER_ONLY: only the options given count, not the defaults), and LoaderUnavailable
    without DALI."""
    require("nvidia.dali", "dali", "dali")
    from . import dali_graph as graphs
    opts = parse_options(graphs.DaliOptions, "dali", options)
    if opts.reader not in READERS:
        raise ValueError(f"option 'reader' of the 'dali' loader must be one of {', '.join(READERS)}, got {opts.reader!r}")
    for name in options or {}:
        reader = graphs.READER_ONLY.get(name)
        if reader is not None and reader != opts.reader:
            raise ValueError(f"option '{name}' of the 'dali' loader is read only by reader '{reader}', and this "
                             f"loader reads with reader '{opts.reader}', where it would do nothing: remove it, or "
                             f"set reader: {reader}")
    if opts.feed_ahead < 0:
        raise ValueError(f"option 'feed_ahead' of the 'dali' loader must be 0 (on the training thread) or more "
                         f"batches, got {opts.feed_ahead}")
    return opts


def preallocate_side(option: int, largest: int | None, max_resolution: int) -> int:
    """The side the GPU decoder's buffers are pre-sized for: the option when given, else the largest stored side
    of the split read (manifest.largest_side), else, for a dataset converted before the manifest recorded it, the
    conversion's --max-resolution, or FULL_SIZE_SIDE for full size."""
    return option or largest or max_resolution or FULL_SIZE_SIDE


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1, rand_augment: RandAugment | None = None,
          ramp: Ramp | None = None) -> DaliLoader:
    from . import dali_graph as graphs
    if (rand_augment is not None or ramp is not None) and (views != 1 or not train):
        raise ValueError("the dali loader applies rand_augment and ramp to train loaders with views=1")
    p = prelude(data, split, parse=parse, options=options, reads=SHARDS, batch_size=batch_size, train=train,
                rank=rank, world_size=world_size, workers=workers)
    opts, shards, samples = p.options, list(p.shards), p.samples
    # the train graph's extra arguments; conditionals (the `if`s of RandAugment's split) only where it runs
    augment = {"rand_augment": rand_augment, "enable_conditionals": True} if rand_augment is not None else {}
    if samples < world_size:
        raise DatasetError(f"{data}: split '{split}' has {samples} samples, fewer than {world_size} ranks")
    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    side = preallocate_side(opts.preallocate_side, largest_side(data, p.manifest, split),
                            p.manifest["settings"]["max_resolution"])
    common = dict(image_size=image_size, gpu=gpu, half=dtype in (torch.float16, torch.bfloat16), options=opts,
                  preallocate_side=side, batch_size=batch_size, num_threads=max(1, p.workers),
                  device_id=device_id, prefetch_queue_depth=opts.prefetch_queue_depth)  # workers 0: DALI needs a thread
    where = f"split '{split}' of {data} ({len(shards)} shards in {shards[0][0].parent})"
    knobs = (f"data.options.prefetch_queue_depth ({opts.prefetch_queue_depth}), the decoder's preallocation "
             f"data.options.preallocate_side ({side} px) and padding data.options.device_memory_padding / "
             f"host_memory_padding ({opts.device_memory_padding:,} / {opts.host_memory_padding:,} bytes)")
    if opts.reader == "index":
        return _indexed(p, train=train, views=views, rank=rank, world_size=world_size, seed=seed, dtype=dtype,
                        where=where, knobs=knobs, common=common | augment, rand_augment=rand_augment, ramp=ramp)
    definition = graphs.two_view_pipeline if views == 2 else graphs.train_pipeline if train else graphs.eval_pipeline
    pipeline_shards = [(str(t), str(i)) for t, i in shards]

    def make_pipeline(epoch: int):
        # the sample order from (seed, epoch), the same on every rank; the augmentation from (seed, epoch, rank)
        pipeline = definition(pipeline_shards, shard_id=(rank + epoch) % world_size, num_shards=world_size,
                              reader_seed=dali_seed(seed, epoch), seed=dali_seed(seed, epoch, rank),
                              **(common | augment |
                                 {"image_size": train_size(image_size, ramp, epoch) if train else image_size}))
        pipeline.build()
        return pipeline

    # Train: every rank runs as many steps as the smallest shard allows; eval: this rank's shard, padded.
    per_rank = samples // world_size if train else shard_size(samples, rank, world_size)
    return DaliLoader(make_pipeline, batches=batches_per_epoch(per_rank, batch_size, train), train=train,
                      dtype=dtype, where=where, knobs=knobs, views=views, seekable=False)


def _indexed(p: Prelude, *, train: bool, views: int, rank: int, world_size: int, seed: int, dtype: torch.dtype,
             where: str, knobs: str, common: dict, rand_augment: RandAugment | None,
             ramp: Ramp | None) -> DaliLoader:
    from . import dali_graph as graphs
    from .dali_source import IndexedSource, Plan
    # the contract's share of the split (contract.rank_indices), read by index
    plan = Plan(samples=p.samples, batch_size=common["batch_size"], batches=p.batches, train=train, seed=seed,
                rank=rank, world_size=world_size)
    try:
        source = IndexedSource(list(p.shards), plan, views=views, rand_augment=rand_augment, ramp=ramp,
                               ahead=p.options.feed_ahead)
    except (ValueError, KeyError) as e:  # an index that does not parse
        raise DatasetError(f"{where}: {e}; {RECONVERT}") from None
    definition = graphs.indexed_two_view_pipeline if views == 2 else \
        graphs.indexed_train_pipeline if train else graphs.indexed_eval_pipeline

    def make_pipeline(position: int):
        source.start = position
        pipeline = definition(source, seed=dali_seed(seed, 0), **common)  # no random operator: the seed is unused
        pipeline.build()
        return pipeline

    return DaliLoader(make_pipeline, batches=p.batches, train=train, dtype=dtype, where=where, knobs=knobs,
                      views=views, undecodable=source.undecodable)
