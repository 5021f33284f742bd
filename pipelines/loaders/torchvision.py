"""The baseline a user would write without this project: a torch DataLoader over the same stored JPEGs,
decoded with PIL (libjpeg-turbo) on the CPU and augmented with `transforms.v2`, pinned memory and
non-blocking copies. It is the reference for correctness and for speed. (`torchvision.io.decode_jpeg` would
do the same, but it is deprecated since torchvision 0.29.)

It reads the converter's webdataset shards by their index (one pread per sample), so it sees exactly the
images the DALI and FFCV loaders see. Augmentation runs on PIL images in the workers; the batch crosses to
the device as uint8 (a quarter of the float32 bytes) and is normalized there. With views=2 a worker runs the
SimCLR transform (`ssl_transform`) twice per sample, so the two views are independent draws of one RNG stream.

Progressive resolution (`ramp`, train): the workers crop epoch e's samples at ramp.size(e) (ShardDataset), so
the one batch stream that runs across epochs (TorchvisionLoader) crosses into a new size as into a new epoch,
with no restart. RandAugment (`rand_augment`, views=1) runs on the device, on the uint8 batch after the copy and
before normalize (pipelines/rand_augment.py), drawn from a generator seeded per (seed, epoch, rank, batch): like
the crops, a batch's pixels depend only on its position, after a seek too.
"""
from __future__ import annotations

import gc
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from .. import processes
from ..contract import (CROP_RATIO, CROP_SCALE, TWO_VIEWS, NoOptions, RandAugment, Ramp, batches_per_epoch,
                       blur_kernel_size, check_start_batch, eval_resize, normalize, parse_options, rank_indices,
                       rank_samples)
from ..formats.manifest import RECONVERT, DatasetError
from ..formats.webdataset import ShardReader
from .prelude import SHARDS, prelude

# What the workers import to unpickle the dataset and run it: loaded once in the forkserver (processes.py).
TORCHVISION_PRELOAD = ["torch", "torchvision.transforms.v2", "PIL.Image", __name__]


class ShardDataset(Dataset):
    """Sample i of epoch e, augmented with torch's RNG seeded from (seed, e, i): the same crop and flip
    whichever worker reads it, however many workers there are, and after a resume. views=2: a tuple of two
    augmented copies, drawn one after the other from that RNG (reproducible, and different from each other).

    With a ramp (train), epoch e's samples are cropped to ramp.size(e) instead of `transform`'s size: the item
    names its epoch, so the persistent workers follow the ramp as the batch stream crosses into the next epoch,
    with nothing rebuilt; each worker makes one transform per size, on first use (~0.3 ms, once per size)."""

    def __init__(self, shards: list[tuple[Path, Path]], transform, seed: int, split: str, views: int = 1,
                 ramp: Ramp | None = None):
        self.reader = ShardReader(shards)
        self.transform, self.seed, self.split, self.views, self.ramp = transform, seed, split, views, ramp
        self.sized = {}  # ramp: size -> train transform at that size

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = item
        try:
            jpeg, label = self.reader.read(i)
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError) as e:
            raise DatasetError(f"split '{self.split}', {self.reader.where(i)}: {e}; {RECONVERT}") from None
        transform = self.transform if self.ramp is None else self.transform_at(self.ramp.size(epoch))
        # fork_rng: with workers=0 this runs in the trainer's process, whose RNG must not move (~10 us)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
            if self.views == 1:
                return transform(image), label
            return tuple(transform(image) for _ in range(self.views)), label

    def transform_at(self, size: int) -> v2.Transform:
        if size not in self.sized:
            self.sized[size] = transforms(size, train=True) if self.views == 1 else ssl_transform(size)
        return self.sized[size]


class BatchStream(Sampler):
    """This rank's batches of (index, epoch) pairs (contract.rank_indices), from batch `start_batch` of `epoch`
    on and then on into the next epochs, without end: the DataLoader's workers prefetch across an epoch's end
    as they do within it, so the first batch of epoch e + 1 is decoded while the trainer takes e's last ones.
    Each epoch's batches depend on (seed, epoch) alone, never on the epochs streamed before it."""

    def __init__(self, n: int, *, batch_size: int, rank: int, world_size: int, train: bool, seed: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.train, self.seed = train, seed
        self.batches = batches_per_epoch(rank_samples(n, rank=rank, world_size=world_size, train=train), batch_size,
                                         train)
        self.epoch, self.start_batch = 0, 0  # where the next iter() starts

    def indices(self, epoch: int) -> np.ndarray:
        return rank_indices(self.n, rank=self.rank, world_size=self.world_size, train=self.train, seed=self.seed,
                            epoch=epoch)

    def epoch_batches(self, epoch: int, start_batch: int):
        order = self.indices(epoch).tolist()
        for b in range(start_batch, self.batches):  # train: the last partial batch is dropped (batches_per_epoch)
            yield [(i, epoch) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]

    def __iter__(self):
        epoch, start_batch = self.epoch, self.start_batch
        while self.batches:  # an empty split streams nothing (rather than looping forever)
            yield from self.epoch_batches(epoch, start_batch)
            epoch, start_batch = epoch + 1, 0


class TorchvisionLoader:
    """One DataLoader iteration (`stream`) serves epoch after epoch while the trainer asks for the continuation
    (set_epoch(e + 1) after epoch e, or set_epoch(e, k) after batch k - 1 of e). Otherwise the stream restarts
    at the asked position: the persistent workers finish the batches they had prefetched (at most
    prefetch_factor x workers) and go on from there.

    Measured on 2 cores, 2 workers, batch 32, 224 px crops of 512 px images, 202 batches per epoch: with a new
    DataLoader iteration per epoch, the first batch of an epoch came 1.7-2.0 x the median interval within an
    epoch after the previous epoch's last one (222-253 ms against 128 ms); with the stream, 0.3-0.5 x (27-46 ms
    against 100 ms: the workers deliver in pairs, and the boundary falls where the in-epoch intervals do, 27 ms).
    With a ramp (160 -> 192 -> 224 px, 42 batches of 32 per epoch, the 2 cores shared at a load of 4-6) the
    stream runs on across the size changes, and the first batch of an epoch came 0.2-4.6 x the new epoch's
    median interval after the last one before it, the spread measured without a ramp then (0.2-2.3 x)."""

    def __init__(self, dataset: ShardDataset, batches: BatchStream, *, device: torch.device, dtype: torch.dtype,
                 workers: int, seed: int, rank: int = 0, rand_augment: RandAugment | None = None):
        self.batches, self.device, self.dtype = batches, device, dtype
        self.seed, self.rank, self.rand_augment = seed, rank, rand_augment
        if rand_augment is not None:
            from .. import rand_augment as device_rand_augment  # only then: a run without it needs no such module
            self.device_rand_augment = device_rand_augment
        self.epoch, self.start_batch = 0, 0
        self.stream, self.next_position = None, None  # the stream and the (epoch, batch) it yields next
        # forkserver unless this process runs a single thread (pipelines/processes.py); workers get the dataset
        # pickled (shard paths and index rows, the transform), and die with this process however it ends.
        self.context = processes.context(TORCHVISION_PRELOAD) if workers else None
        # Host -> device: pin_memory's thread pins each batch; __iter__ copies it non_blocking on the current
        # stream, which the normalization and the model then use, so the copy is ordered before them with no
        # sync (and the caching host allocator keeps the pinned buffer until the copy has run).
        self.loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 multiprocessing_context=self.context, worker_init_fn=processes.tie_to_parent,
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.batches.batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, check_start_batch(start_batch, len(self))

    def position(self, epoch: int, batch: int) -> tuple[int, int]:
        """(epoch, batch) as the stream counts it: the end of an epoch is the start of the next one, and eval
        epochs are all alike (the same order, no randomness), so evaluating again goes on with the stream."""
        if batch == len(self):
            epoch, batch = epoch + 1, 0
        return (epoch if self.batches.train else 0), batch

    def restart(self) -> None:
        if self.context is not None and self.context.get_start_method() == "fork" and self.stream is None:
            # The workers fork here. A DALI pipeline left for the garbage collector in this process would be
            # destroyed in a worker, where its destructor blocks forever: collect it before forking.
            gc.collect()
        self.batches.epoch, self.batches.start_batch = self.epoch, self.start_batch
        self.stream = iter(self.loader)  # persistent workers: the same workers, reset to the new start
        self.next_position = self.position(self.epoch, self.start_batch)

    def __iter__(self):
        if self.stream is None or self.next_position != self.position(self.epoch, self.start_batch):
            self.restart()
        epoch = self.epoch
        for batch in range(self.start_batch, len(self)):
            try:
                images, labels = next(self.stream)
            except BaseException:  # a sample that failed, Ctrl-C: where the stream stands is unknown, restart
                self.next_position = None
                raise
            self.next_position = self.position(epoch, batch + 1)
            try:  # the device side: the copy, RandAugment, normalize (the workers name a sample that fails)
                labels = labels.to(self.device, non_blocking=True)
                if isinstance(images, torch.Tensor):
                    images = images.to(self.device, non_blocking=True)
                    if self.rand_augment is not None:  # uint8 in, a new uint8 tensor out, on the device
                        ra = self.device_rand_augment  # its draws: per (seed, epoch, rank, batch), as the crops are
                        images = ra.rand_augment(images, self.rand_augment,
                                                 ra.batch_generator(images.device, self.seed, epoch, self.rank, batch))
                    out = normalize(images, self.dtype), labels
                else:  # views=2: collated into a sequence of batches, one per view
                    out = tuple(normalize(view.to(self.device, non_blocking=True), self.dtype)
                                for view in images), labels
            except Exception as error:  # out of memory says what to lower; anything else is raised as it was
                from .errors import is_out_of_memory, out_of_memory
                if is_out_of_memory(error):
                    raise out_of_memory(f"split '{self.loader.dataset.split}'", error, "data.image_size") from error
                raise
            yield out


def transforms(image_size: int, train: bool) -> v2.Transform:
    """PIL image -> uint8 3 x size x size tensor. The geometry runs on the PIL image, before the tensor."""
    if train:
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
                           v2.RandomHorizontalFlip(0.5), v2.PILToTensor()])
    return v2.Compose([v2.Resize(eval_resize(image_size), antialias=True), v2.CenterCrop(image_size),
                       v2.PILToTensor()])


def ssl_transform(image_size: int) -> v2.Transform:
    """One SimCLR view (contract.TWO_VIEWS): PIL image -> uint8 3 x size x size tensor. The colour ops run on the
    PIL image (ColorJitter takes 1.9 ms on a 128-px PIL image, 3.3 ms on its tensor, one thread); the blur on
    the tensor (on a PIL image torchvision converts to a tensor and back). The blur is the costly step:
    ~5 ms at 128 px, a 2-D convolution with a kernel 10 % of the side."""
    size = blur_kernel_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
        v2.RandomHorizontalFlip(TWO_VIEWS.flip_p),
        v2.RandomApply([v2.ColorJitter(TWO_VIEWS.brightness, TWO_VIEWS.contrast, TWO_VIEWS.saturation,
                                       TWO_VIEWS.hue)], p=TWO_VIEWS.jitter_p),
        v2.RandomGrayscale(TWO_VIEWS.gray_p),
        v2.PILToTensor(),
        v2.RandomApply([v2.GaussianBlur(size, sigma=TWO_VIEWS.blur_sigma)], p=TWO_VIEWS.blur_p)])


def parse(options: dict | None) -> NoOptions:
    """The torchvision loader has no options beyond `workers`: any key is a ValueError that says so."""
    return parse_options(NoOptions, "torchvision", options)


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1, rand_augment: RandAugment | None = None,
          ramp: Ramp | None = None) -> TorchvisionLoader:
    p = prelude(data, split, parse=parse, options=options, reads=SHARDS, batch_size=batch_size, train=train,
                rank=rank, world_size=world_size, workers=workers)
    try:
        transform = transforms(image_size, train) if views == 1 else ssl_transform(image_size)
        dataset = ShardDataset(list(p.shards), transform, seed, split, views, ramp if train else None)
    except ValueError as e:  # an index that does not parse
        raise DatasetError(f"{e}; {RECONVERT}") from None
    batches = BatchStream(len(dataset), batch_size=batch_size, rank=rank, world_size=world_size, train=train,
                          seed=seed)
    return TorchvisionLoader(dataset, batches, device=torch.device(device), dtype=dtype, workers=p.workers,
                             seed=seed, rank=rank, rand_augment=rand_augment)
