"""The `dali` loader: the pipelines of dali_pipeline.py behind the loader contract.

DALI returns HWC batches; `permute(0, 3, 1, 2)` turns them into NCHW tensors that are channels_last with no
copy. For bf16 DALI emits fp16 (half the bytes of fp32; DALI has no bf16) and torch converts it on the GPU.

Epochs: each train epoch gets a fresh pipeline seeded with (seed, epoch) that reads shard
(rank + epoch) % world_size. A pipeline that ran on would let its shuffle buffer carry samples across the epoch
boundary, so an epoch would depend on the ones before it and a resumed run would read other samples than an
uninterrupted one. The rebuild costs one pipeline build and a buffer fill per epoch (seconds, against minutes
for an ImageNet epoch). Each epoch yields the same number of batches on every rank (DDP steps in lockstep).
Eval reads shards that stick to their rank and pads the last batch; the iterator drops the padding, so every
sample counts exactly once across ranks; one pipeline serves every evaluation.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .contract import batches_per_epoch, default_workers, parse_options, require
from .formats.manifest import RECONVERT, DatasetError, check_files, dali_shards, load_manifest, split_info

# ImageNet's largest JPEG is about 6,000 px on a side; DALI's ResNet-50 example pre-sizes for 5,980 x 6,430.
FULL_SIZE_SIDE = 6430


def dali_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def shard_size(samples: int, shard_id: int, num_shards: int) -> int:
    """Samples DALI's reader gives shard `shard_id` of `num_shards` (contiguous, sizes differ by at most one)."""
    return samples * (shard_id + 1) // num_shards - samples * shard_id // num_shards


class DaliLoader:
    def __init__(self, make_pipeline: Callable[[int], object], *, batches: int, train: bool, dtype: torch.dtype,
                 where: str, views: int = 1):
        self.make_pipeline, self.batches, self.train = make_pipeline, batches, train
        self.image_outputs = ["images"] if views == 1 else [f"view{v}" for v in range(views)]  # pipeline outputs
        self.dtype, self.where = dtype, where
        self.epoch = 0
        self._iterator = None
        self._at_epoch_start = False  # eval: the running pipeline was read to its end and reset

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _start(self, epoch: int):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from .dali_pipeline import READER
        self._iterator = None  # frees the previous pipeline's buffers first
        with dali_errors(self.where):
            self._iterator = DALIGenericIterator(
                self.make_pipeline(epoch), [*self.image_outputs, "labels"], reader_name=READER,
                last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)

    def __iter__(self):
        if self.batches == 0:  # this rank's share is smaller than a batch (DALI would report an empty pipeline)
            return
        # Train: a fresh pipeline per epoch (module docstring). Eval has no randomness: one pipeline serves every
        # evaluation, unless the last one was left mid-epoch.
        if self.train or not self._at_epoch_start:
            self._start(self.epoch if self.train else 0)
        iterator, self._at_epoch_start = self._iterator, False
        with dali_errors(self.where):
            for step, (out,) in enumerate(iterator):
                if step == self.batches:  # a rank whose shard is one sample longer: skip its extra batch
                    continue
                # NHWC memory, NCHW shape: channels_last
                images = tuple(out[name].permute(0, 3, 1, 2).to(self.dtype) for name in self.image_outputs)
                yield images[0] if len(images) == 1 else images, out["labels"].squeeze(1).long()
        iterator.reset()
        self._at_epoch_start = True


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


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1) -> DaliLoader:
    require("nvidia.dali", "dali", "dali")
    from .dali_pipeline import DaliOptions, eval_pipeline, train_pipeline, two_view_pipeline
    opts = parse_options(DaliOptions, "dali", options)
    manifest = load_manifest(data)
    shards = dali_shards(data, manifest, split)
    check_files(data, manifest, [path for pair in shards for path in pair])
    samples = split_info(data, manifest, split)["samples"]
    if samples < world_size:
        raise DatasetError(f"{data}: split '{split}' has {samples} samples, fewer than {world_size} ranks")
    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    max_side = manifest["settings"]["max_resolution"]
    preallocate = opts.preallocate_side or (max_side if max_side else FULL_SIZE_SIDE)
    threads = default_workers(world_size) if workers is None else max(1, workers)  # 0: DALI needs a thread
    definition = two_view_pipeline if views == 2 else train_pipeline if train else eval_pipeline

    def make_pipeline(epoch: int):
        pipeline = definition(
            [(str(t), str(i)) for t, i in shards], image_size=image_size, gpu=gpu,
            half=dtype in (torch.float16, torch.bfloat16), shard_id=(rank + epoch) % world_size,
            num_shards=world_size, options=opts, preallocate_side=preallocate,
            batch_size=batch_size, num_threads=threads, device_id=device_id,
            prefetch_queue_depth=opts.prefetch_queue_depth, seed=dali_seed(seed, epoch))
        pipeline.build()
        return pipeline

    # Train: every rank runs as many steps as the smallest shard allows; eval: this rank's shard, padded.
    per_rank = samples // world_size if train else shard_size(samples, rank, world_size)
    return DaliLoader(make_pipeline, batches=batches_per_epoch(per_rank, batch_size, train), train=train,
                      dtype=dtype, where=f"split '{split}' of {data} ({len(shards)} shards in {shards[0][0].parent})",
                      views=views)
