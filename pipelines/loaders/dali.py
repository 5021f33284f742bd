"""The `dali` loader: the pipelines of loaders/dali_graph.py behind the loader contract.

DALI returns HWC batches; `permute(0, 3, 1, 2)` turns them into NCHW tensors that are channels_last with no
copy. For bf16 DALI emits fp16 (half the bytes of fp32; DALI has no bf16) and torch converts it on the GPU.

Reader "index" (the default): one pipeline runs on from epoch to epoch. Its external source
(dali_source.IndexedSource) makes each batch a function of its position alone, so the pipeline's prefetch fills
the next epoch's first batches while this epoch's last ones train (an epoch start costs no more than a batch),
and `set_epoch(epoch, start_batch)` that is not the continuation builds a new pipeline at that position (a resume
at 90 % of an ImageNet epoch starts as fast as one at 0). Eval reads rank, rank + world_size, ... in stored order;
its last batch is smaller, so every sample counts exactly once across ranks.

Reader "webdataset": each train epoch gets a fresh pipeline seeded with (seed, epoch) that reads shard
(rank + epoch) % world_size; a pipeline that ran on would let its shuffle buffer carry samples across the epoch
boundary, so an epoch would depend on the ones before it. That reader cannot seek: a start_batch is reached by
reading the batches before it. Eval reads shards that stick to their rank and pads the last batch; the
iterator drops the padding; one pipeline serves every evaluation.

Train, views=1: `rand_augment` adds RandAugment to the graph (dali_graph._rand_augment), built with DALI's
conditionals, which only these graphs turn on; `ramp` sets epoch e's side to ramp.size(e): through the index
reader's source, per sample, on the running pipeline (no rebuild at an epoch start: DALIGenericIterator takes the
new shape as it comes); for the webdataset reader, in the epoch's fresh pipeline. Eval reads image_size.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..contract import RandAugment, Ramp, batches_per_epoch, check_start_batch, parse_options, require, train_size
from ..formats.manifest import RECONVERT, DatasetError
from .prelude import SHARDS, Prelude, prelude

# ImageNet's largest JPEG is about 6,000 px on a side; DALI's ResNet-50 example pre-sizes for 5,980 x 6,430.
FULL_SIZE_SIDE = 6430
READERS = ("index", "webdataset")


def dali_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def shard_size(samples: int, shard_id: int, num_shards: int) -> int:
    """Samples DALI's reader gives shard `shard_id` of `num_shards` (contiguous, sizes differ by at most one)."""
    return samples * (shard_id + 1) // num_shards - samples * shard_id // num_shards


class DaliLoader:
    """`make_pipeline(at)` builds a pipeline: at a position (epoch x batches + batch; eval: the batch) for the
    index reader, for an epoch for the webdataset reader (`seekable` False)."""

    def __init__(self, make_pipeline: Callable[[int], object], *, batches: int, train: bool, dtype: torch.dtype,
                 where: str, views: int = 1, seekable: bool = True):
        self.make_pipeline, self.batches, self.train, self.seekable = make_pipeline, batches, train, seekable
        self.image_outputs = ["images"] if views == 1 else [f"view{v}" for v in range(views)]  # pipeline outputs
        self.dtype, self.where = dtype, where
        self.epoch = self.start_batch = 0
        self._iterator = None
        self._next = None  # the position the running pipeline yields next (None: no usable pipeline)

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, check_start_batch(start_batch, self.batches)

    def _start(self, at: int):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from .dali_graph import READER
        self._iterator = None  # frees the previous pipeline's buffers first
        with dali_errors(self.where):
            if self.seekable:  # an endless source: the iterator never ends an epoch, this wrapper counts
                self._iterator = DALIGenericIterator(self.make_pipeline(at), [*self.image_outputs, "labels"])
            else:
                self._iterator = DALIGenericIterator(
                    self.make_pipeline(at), [*self.image_outputs, "labels"], reader_name=READER,
                    last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)

    def _batch(self, out: dict):
        images = tuple(out[name].permute(0, 3, 1, 2).to(self.dtype) for name in self.image_outputs)  # channels_last
        return images[0] if len(images) == 1 else images, out["labels"].squeeze(1).long()

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
        with dali_errors(self.where):
            for _ in range(self.start_batch, self.batches):
                try:
                    (out,) = next(self._iterator)
                except BaseException:
                    self._next = None  # the pipeline's state is unknown: the next iteration builds a new one
                    raise
                self._next += 1
                yield self._batch(out)

    def _sequential(self):
        # Train: a fresh pipeline per epoch (module docstring). Eval has no randomness: one pipeline serves every
        # evaluation, unless the last one was left mid-epoch.
        if self.train or self._next != 0:
            self._start(self.epoch if self.train else 0)
        iterator, self._next = self._iterator, None
        with dali_errors(self.where):
            for step, (out,) in enumerate(iterator):
                if step >= self.batches:  # a rank whose shard is one sample longer: skip its extra batch
                    continue
                if step >= self.start_batch:  # this reader cannot seek: the batches before are read and dropped
                    yield self._batch(out)
        iterator.reset()
        self._next = 0


@contextmanager
def dali_errors(where: str):
    """DALI reports a damaged shard or index as a RuntimeError deep in its threads; say which data and the fix."""
    try:
        yield
    except RuntimeError as error:
        raise DatasetError(f"DALI could not read {where}: {dali_reason(str(error))}\n  {RECONVERT}") from error


def dali_reason(message: str) -> str:
    """The operator and the cause out of DALI's error text, without its Python traceback and C++ context."""
    operator = re.search(r"Error in (?:CPU|GPU|MIXED|Mixed) operator `([^`]+)`", message)
    cause = message.split("encountered:", 1)[-1]
    cause = re.split(r"\nC\+\+ context|\nCurrent pipeline object", cause)[0].strip()
    cause = cause if len(cause) <= 300 else cause[:300] + "..."
    return f"{operator.group(1)}: {cause}" if operator else cause


def parse(options: dict | None):
    """The DaliOptions of `options`; ValueError for an unknown or ill-typed one, LoaderUnavailable without DALI."""
    require("nvidia.dali", "dali", "dali")
    from . import dali_graph as graphs
    opts = parse_options(graphs.DaliOptions, "dali", options)
    if opts.reader not in READERS:
        raise ValueError(f"option 'reader' of the 'dali' loader must be one of {', '.join(READERS)}, got {opts.reader!r}")
    return opts


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
    max_side = p.manifest["settings"]["max_resolution"]
    common = dict(image_size=image_size, gpu=gpu, half=dtype in (torch.float16, torch.bfloat16), options=opts,
                  preallocate_side=opts.preallocate_side or (max_side if max_side else FULL_SIZE_SIDE),
                  batch_size=batch_size, num_threads=max(1, p.workers),
                  device_id=device_id, prefetch_queue_depth=opts.prefetch_queue_depth)  # workers 0: DALI needs a thread
    where = f"split '{split}' of {data} ({len(shards)} shards in {shards[0][0].parent})"
    if opts.reader == "index":
        return _indexed(p, train=train, views=views, rank=rank, world_size=world_size, seed=seed, dtype=dtype,
                        where=where, common=common | augment, rand_augment=rand_augment, ramp=ramp)
    definition = graphs.two_view_pipeline if views == 2 else graphs.train_pipeline if train else graphs.eval_pipeline
    pipeline_shards = [(str(t), str(i)) for t, i in shards]

    def make_pipeline(epoch: int):
        pipeline = definition(pipeline_shards, shard_id=(rank + epoch) % world_size, num_shards=world_size,
                              seed=dali_seed(seed, epoch), **(common | augment |
                              {"image_size": train_size(image_size, ramp, epoch) if train else image_size}))
        pipeline.build()
        return pipeline

    # Train: every rank runs as many steps as the smallest shard allows; eval: this rank's shard, padded.
    per_rank = samples // world_size if train else shard_size(samples, rank, world_size)
    return DaliLoader(make_pipeline, batches=batches_per_epoch(per_rank, batch_size, train), train=train,
                      dtype=dtype, where=where, views=views, seekable=False)


def _indexed(p: Prelude, *, train: bool, views: int, rank: int, world_size: int, seed: int, dtype: torch.dtype,
             where: str, common: dict, rand_augment: RandAugment | None, ramp: Ramp | None) -> DaliLoader:
    from . import dali_graph as graphs
    from .dali_source import IndexedSource, Plan
    # the contract's share of the split (contract.rank_indices), read by index
    plan = Plan(samples=p.samples, batch_size=common["batch_size"], batches=p.batches, train=train, seed=seed,
                rank=rank, world_size=world_size)
    try:
        source = IndexedSource(list(p.shards), plan, views=views, rand_augment=rand_augment, ramp=ramp)
    except (ValueError, KeyError) as e:  # an index that does not parse
        raise DatasetError(f"{where}: {e}; {RECONVERT}") from None
    definition = graphs.indexed_two_view_pipeline if views == 2 else \
        graphs.indexed_train_pipeline if train else graphs.indexed_eval_pipeline

    def make_pipeline(position: int):
        source.start = position
        pipeline = definition(source, seed=dali_seed(seed, 0), **common)  # no random operator: the seed is unused
        pipeline.build()
        return pipeline

    return DaliLoader(make_pipeline, batches=p.batches, train=train, dtype=dtype, where=where, views=views)
