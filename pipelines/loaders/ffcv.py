"""The `ffcv` loader: FFCV's Loader over the converter's .beton, behind the loader contract.

Decode and crop run in FFCV's numba threads with libjpeg-turbo (`RandomResizedCropRGBImageDecoder` decodes at
a reduced scale when the crop allows); flip and `ToTensor` follow; the batch crosses to the device as uint8
(`ToDevice`, a quarter of the float32 bytes) and `ToTorchImage` makes it a channels_last NCHW view.

Normalization runs in torch on the device (contract.normalize), not in FFCV's `NormalizeImage`: on the GPU
that operation needs cupy and pytorch-pfn-extras (a ~100 MB CUDA-specific wheel) for a one-line elementwise
kernel, and on the CPU it hangs FFCV's Loader when it follows `ToTensor` (FFCV issue #396). One torch kernel
does the same arithmetic, on either device, with the same code.

Order: `RankOrder` gives FFCV the contract's per-rank sample order (contract.rank_indices), so a rank reads
the same samples as under every other loader, with or without a process group. `options={"order":
"quasi_random"}` selects FFCV's page-aware shuffle instead, for a .beton larger than RAM (with `os_cache`
False); under several ranks that one needs torch.distributed initialized (torchrun), as FFCV's
`distributed=True` asks. Both seek (set_epoch's start_batch) by handing FFCV the epoch's order from that batch
on (SeekableOrder): FFCV decodes the samples of the order it is given, and no others.

Two views (views=2): a second output decodes the same image field again with its own random-resized-crop and
flip (a `PipelineSpec` whose source is "image"); the colour jitter, grayscale and blur, which FFCV does not
have, run in torch on the device on each view (device_augment.py), before the normalization.

RandAugment (`rand_augment`, views=1) runs in torch on the device too, on the uint8 batch, before normalize
(pipelines/rand_augment.py), drawn per (seed, epoch, rank, batch); FFCV's crops before it stay unseeded.

Progressive resolution (`ramp`): one FFCV Loader, compiled once, for every size. FFCV's compiled code does not
depend on the output size: numba specializes on array types (dtype, dimensions, layout), not shapes, and the
decoder writes into whatever buffer it is handed. The buffers are allocated by each EpochIterator in its
constructor, from the decoder's `output_size` then (Graph.allocate_memory -> declare_state_and_memory). So
FfcvLoader.start sets the train decoders' output_size to the epoch's size before it starts that epoch's
iterator, the one started ahead included. Measured on the 2 development cores (shared, load 2-5), batch 32,
ramp 160 -> 192 -> 224 px from 512 px images, 42 batches per epoch: no numba compilation after the first
epoch, and the first batch of an epoch came 0.8-2.7 x the new epoch's median interval after the last one
before it (e.g. 243 ms against 156 ms), as without a ramp in the same conditions (0.8-2.1 x). The alternatives
cost more: Loader(recompile=True) made 7 numba compilations at every epoch start, 10-15 s (75-95 x); one Loader
per size costs 0.45 s to build and 16 s of compilation at its first batch (numba compiles a new Loader's
pipeline afresh), at the size change when built lazily, or that much per size at the start when built upfront.

Buffers: FFCV decodes into batches_ahead + 2 slots of buffers that it reuses, and copies each batch to the device
without waiting for the copy on the host. SlotGuard keeps its decode thread off a slot until the device is done
with the batch the slot held, and FfcvLoader.discard keeps an epoch's buffers until the device is done with them.

Errors: a device out of memory (in the copy, RandAugment, the colour augmentation or normalize) is a
DeviceOutOfMemory that names the settings to lower (errors.py); FFCV failing to open or read the .beton is a
DatasetError that names it and says to convert again; any other error is raised as it was. FFCV decodes a damaged
JPEG inside a .beton into wrong pixels without an error (libjpeg-turbo's status is not checked): that damage is
tools/verify_dataset.py's to find, by its sha256.
"""
from __future__ import annotations

import functools
import queue
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..contract import (CROP_RATIO, CROP_SCALE, EVAL_CROP_FRACTION, RandAugment, Ramp, check_start_batch, normalize,
                       parse_options, rank_indices, require, train_size)
from ..formats.manifest import RECONVERT, DatasetError
from .errors import is_out_of_memory, out_of_memory
from .prelude import BETON, prelude


@dataclass(frozen=True)
class FfcvOptions:
    """The knobs that matter for speed (docs/loaders.md, "Speed knobs"). `workers` sets FFCV's decode threads."""
    batches_ahead: int = 3  # batches decoded ahead of the trainer
    # True: the .beton sits in the page cache, shared by all ranks (ffcv-imagenet's in_memory=1); fits when
    # RAM holds it (ImageNet at --max-resolution 512 is ~60 GB). False: each process reads pages itself.
    os_cache: bool = True
    order: str = "random"  # "random": the contract's order; "quasi_random": FFCV's page-aware shuffle


class SeekableOrder:
    """An FFCV traversal order: the epoch's order from the batch set_epoch asked for on. FFCV's Loader calls an
    order *instance* with itself (`order(loader)`), so this object is that callable and the order it returns.

    FFCV takes the order as given: its EpochIterator cuts it into batches and decodes those alone, so the
    batches before `start_batch` are never read. The Loader's len() is that of the order it asked for when it
    was built (start_batch 0), and each epoch it keeps the first len() x batch_size samples, a no-op on a
    shorter order: the cut to whole batches (train) is made here, before the seek, as for an uninterrupted
    epoch. `inner(loader)` makes the full order: RankOrder (the contract's) or QuasiRandomOrder (FFCV's)."""

    def __init__(self, inner, *, batch_size: int, train: bool):
        self.inner, self.batch_size, self.train = inner, batch_size, train
        self.full, self.start_batch = None, 0

    def __call__(self, loader) -> SeekableOrder:
        self.full = self.inner(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order = np.asarray(self.full.sample_order(epoch))
        if self.train:  # drop_last: whole batches only
            order = order[:len(order) // self.batch_size * self.batch_size]
        return order[self.start_batch * self.batch_size:]


class RankOrder:
    """The contract's per-rank order (contract.rank_indices), as an FFCV order for SeekableOrder."""

    def __init__(self, loader, *, rank: int, world_size: int, train: bool, seed: int):
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, seed
        self.samples = len(loader.indices)

    def sample_order(self, epoch: int) -> np.ndarray:
        return rank_indices(self.samples, rank=self.rank, world_size=self.world_size, train=self.train,
                            seed=self.seed, epoch=epoch)


class QuasiRandomOrder:
    """FFCV's QuasiRandom (page-aware shuffle), reproducible per (seed, epoch). Its sample_order shuffles its
    page table in place, so an epoch's order depended on the orders drawn before it (a resumed run, or a seek,
    would read another one); each epoch here starts from the table as it was built."""

    def __init__(self, loader):
        from ffcv.traversal_order import QuasiRandom
        self.order = QuasiRandom(loader)
        self.pages = self.order.page_to_samples_array.copy()

    def sample_order(self, epoch: int) -> np.ndarray:
        self.order.page_to_samples_array = self.pages.copy()
        return self.order.sample_order(epoch)


class FfcvLoader:
    """FFCV's Loader starts each epoch with a new EpochIterator, a thread that decodes batches_ahead batches
    ahead, from scratch: the first batch of an epoch waits for a whole batch's decode. So in training, once
    the current epoch's thread has decoded its last batch (the trainer still has up to batches_ahead of them
    to take), the next epoch's iterator starts, for the continuation: set_epoch(e + 1) after epoch e. A
    set_epoch that asks for anything else discards it. One loader never runs two decode threads at once (they
    would split numba's threads). Eval starts each pass anew: it runs once per evaluation, not per epoch.
    Measured on 2 cores, 2 threads, batch 32, 224 px crops of 512 px images, 202 batches per epoch: the gap
    from an epoch's last batch to the next one's first fell from 1.8-2.4 x the median interval within an epoch
    (145-198 ms against 81 ms) to 1.3-1.6 x (80-99 ms against 62 ms).

    A ramp changes the crop size at start() (see the module's docstring): the iterator started ahead is already
    at the next epoch's size.

    Random crops and flips are drawn in FFCV's numba code from numba's per-thread generators, which nothing
    seeds (FFCV's `seed` only orders the samples): pixels are not reproducible per (seed, epoch), with or
    without a seek; the samples and their order are."""

    def __init__(self, loader, *, dtype: torch.dtype, where: str, augment: torch.nn.Module | None = None,
                 crops: tuple = (), image_size: int = 0, ramp: Ramp | None = None,
                 rand_augment: RandAugment | None = None, seed: int = 0, rank: int = 0):
        self.loader, self.dtype, self.where = loader, dtype, where
        self.order: SeekableOrder = loader.traversal_order  # what FFCV's Loader made of `order(loader)`
        self.augment = augment  # views=2: device_augment.ColourAugment, run on each view
        if augment is not None:
            from ..device_augment import batch_random  # its draws: per (seed, epoch, rank, batch)
            self.colour_random = batch_random
        # The ramp: the RandomResizedCrop decoders whose output_size start() sets to each epoch's size.
        self.crops, self.image_size, self.ramp = crops, image_size, ramp
        self.rand_augment, self.seed, self.rank = rand_augment, seed, rank
        if rand_augment is not None:
            from .. import rand_augment as device_rand_augment  # only then: a run without it needs no such module
            self.device_rand_augment = device_rand_augment
        self.epoch, self.start_batch = 0, 0
        self.ahead = None  # (epoch, EpochIterator) of the next epoch, started before this one ended
        self.running = None  # the EpochIterator of the latest iteration
        self.on_device = copies_to_device(loader)
        self.retired = []  # (event, EpochIterator) of ended epochs whose buffers the device may still use (discard)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, check_start_batch(start_batch, len(self))

    def start(self, epoch: int, start_batch: int):
        """A new EpochIterator (FFCV's decode thread) for `epoch` from `start_batch`, its slots guarded."""
        self.order.start_batch = start_batch
        if self.ramp is not None:  # read by the EpochIterator's allocation, made in its constructor (see build)
            size = train_size(self.image_size, self.ramp, epoch)
            for decoder in self.crops:
                decoder.output_size = (size, size)
        self.loader.next_epoch = epoch  # FFCV would move on by itself; every loader repeats until set_epoch
        try:
            iterator = iter(self.loader)
        except OSError as e:  # the .beton gone or unreadable since the build: FFCV maps it here
            raise self.read_fault(e) from e
        SlotGuard.install(iterator, on_device=self.on_device)
        return iterator

    def read_fault(self, error: OSError) -> DatasetError:
        return DatasetError(f"FFCV could not read {self.where}: {type(error).__name__}: {error}; {RECONVERT}")

    def epoch_iterator(self):
        # An iteration left mid-epoch without being closed (a benchmark or trainer that moves on to another
        # epoch and drops the generator) still has its decode thread: stop it before another one starts. Two
        # EpochIterators decoding at once for one Loader stall each other (seen as a hang in FFCV's queues).
        if self.running is not None and self.running.is_alive():
            self.discard(self.running)
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            epoch, iterator = ahead
            if (epoch, 0) == (self.epoch, self.start_batch):
                return iterator
            self.discard(iterator)
        return self.start(self.epoch, self.start_batch)

    def __iter__(self):
        epoch, first, iterator = self.epoch, self.start_batch, None
        try:
            iterator = self.running = self.epoch_iterator()
            guard: SlotGuard = iterator.slot_guard
            for index, (images, labels, *second_view) in enumerate(iterator):
                batch = first + index
                if self.order.train and self.ahead is None and not iterator.is_alive() and guard.error is None:
                    self.ahead = epoch + 1, self.start(epoch + 1, 0)  # this epoch is decoded: start the next
                follow_on_current_stream(iterator)
                # What is yielded is new (normalize's output, the labels' copy): a batch the trainer keeps stays
                # intact when FFCV reuses the slot it came in.
                labels = labels.to(torch.int64, copy=True)
                if not second_view:
                    if self.rand_augment is not None:  # uint8 in, a new uint8 tensor out, on the device
                        ra = self.device_rand_augment  # its draws: per (seed, epoch, rank, batch)
                        images = ra.rand_augment(images, self.rand_augment, ra.batch_generator(
                            images.device, self.seed, epoch, self.rank, batch))
                    out = normalize(images, self.dtype), labels
                else:  # uint8 -> [0, 1] float, colour-augmented, normalized: new tensors as well
                    random = self.colour_random(images.device, self.seed, epoch, self.rank, batch)
                    out = tuple(normalize(self.augment(view.float().div_(255), random), self.dtype)
                                for view in (images, *second_view)), labels
                guard.release(index)  # every read of the slot's buffers is queued
                yield out
            if guard.error is not None:  # FFCV's thread failed, and ended the epoch there
                if isinstance(guard.error, OSError):
                    raise self.read_fault(guard.error) from guard.error
                raise guard.error
        except Exception as error:
            if is_out_of_memory(error):
                raise out_of_memory(self.where, error, f"data.options.batches_ahead ({self.loader.batches_ahead})"
                                    ) from error
            raise
        finally:  # an epoch left early (a break, an error): its thread must not decode beside the next one
            if iterator is not None:
                self.discard(iterator)

    def discard(self, iterator) -> None:
        """Ends an EpochIterator's thread if it still runs (stop), and keeps the iterator, and with it its
        buffers, until the device has run everything queued on them so far. Freed, its buffers go back to
        torch's caching allocators, which do not know of FFCV's copies (queued on FFCV's streams, from numpy
        views of the pinned memory): a new allocation could otherwise be written while such a copy still reads
        or writes it. No wait: an event marks that point, and the iterator is dropped at a later discard once
        the event has completed."""
        if iterator.is_alive():
            stop(iterator)
        if not self.on_device:  # on the CPU every read has run by the time the consumer moves on
            return
        current = torch.cuda.current_stream()
        for stream in iterator.cuda_streams:  # with them the copies of batches decoded but never taken
            current.wait_stream(stream)
        done = torch.cuda.Event()
        done.record(current)
        self.retired = [(event, kept) for event, kept in self.retired if not event.query()] + [(done, iterator)]


class SlotGuard:
    """Keeps FFCV's decode thread off a buffer slot until the device is done with the batch the slot held, and
    hands an error raised in that thread to the consumer.

    FFCV's EpochIterator decodes batch b into slot b mod (batches_ahead + 2): its thread writes the slot's pinned
    host buffers, then ToDevice queues a non-blocking copy from them into the slot's device buffers, on a CUDA
    stream of the slot's. FFCV guards a slot on the device only: the next copy into it waits for an event
    recorded on the consumer's stream. Nothing makes the host wait, so when the consumer's stream runs several
    batches behind the host, the thread decodes batch b + slots into host buffers whose copy for batch b is
    still queued, and that copy delivers the newer pixels.

    Here the thread waits, before it decodes batch b + slots, for an event the consumer recorded once it had
    queued its last read of batch b (release), on the stream it read on. That stream waited for b's copy before
    reading (FFCV's __next__, follow_on_current_stream), so the event completes only after the copy out of the
    host buffers and every read of the device buffers; the copy into the slot is queued after the wait.
    The event always exists when the thread needs it: the thread decodes batch b + slots right after it has put
    batch b + slots - 1 into its queue of batches_ahead batches, which has room only once the consumer has taken
    batches 0 to b + 1, and the consumer takes b + 1 after it has released b (batches_ahead >= 1, parse()).
    The wait is the loader thread's, not the training loop's, and when the device keeps up the event has long
    completed; when it lags, FFCV's thread waits for it with one batch per slot decoded and not yet read."""

    def __init__(self, slots: int, on_device: bool):
        self.slots, self.on_device = slots, on_device
        self.released: dict[int, torch.cuda.Event] = {}  # batch (0: the iterator's first) -> its release event
        self.error: Exception | None = None  # what FFCV's thread raised; it ended the epoch there

    @classmethod
    def install(cls, iterator, *, on_device: bool) -> SlotGuard:
        """Wraps `iterator.run_pipeline`, which FFCV's thread calls to decode each batch into its slot.

        The thread starts in the iterator's constructor and may have begun its first batches already; the first
        wait is due at batch `slots`, which the thread cannot reach before the consumer has taken two batches,
        after this. An error raised while decoding a batch begun before this (at most the epoch's first ones)
        ends the thread without reaching the consumer, as it does in FFCV itself."""
        guard = iterator.slot_guard = cls(iterator.loader.batches_ahead + 2, on_device)
        decode = weakref.WeakMethod(iterator.run_pipeline)  # weak: the iterator does not hold itself in a cycle

        def run_pipeline(b_ix, batch_indices, batch_slot, cuda_event):
            try:
                guard.wait_for_slot(b_ix)
                return decode()(b_ix, batch_indices, batch_slot, cuda_event)
            except StopIteration:
                raise
            except Exception as error:
                guard.error = error
                raise StopIteration from error  # FFCV's thread ends the epoch; FfcvLoader.__iter__ raises the error
        iterator.run_pipeline = run_pipeline
        return guard

    def wait_for_slot(self, batch: int) -> None:
        """In FFCV's thread, before it decodes `batch` into slot batch mod slots."""
        if self.on_device and batch >= self.slots:
            event = self.released.pop(batch - self.slots, None)
            if event is None:  # never taken: stop() drained it from the queue, and the epoch is over
                raise StopIteration
            event.synchronize()  # on the host: a copy out of the slot may still be queued

    def release(self, batch: int) -> None:
        """In the consumer, once every read of `batch`'s buffers is queued, on the current stream."""
        if self.on_device:
            event = torch.cuda.Event(blocking=True)  # the thread waiting for it sleeps instead of spinning
            event.record()
            self.released[batch] = event


def copies_to_device(loader) -> bool:
    """Whether an FFCV Loader's pipelines end on a CUDA device (ToDevice), so that its batches are copied from
    pinned host buffers with copies the host does not wait for."""
    from ffcv.transforms import ToDevice
    return any(isinstance(op, ToDevice) and torch.device(op.device).type == "cuda"
               for spec in loader.pipeline_specs.values() for op in spec.transforms)


def stop(iterator) -> None:
    """Ends an EpochIterator's thread, waits for it, then releases its epoch's memory (FFCV's own close()
    releases it without waiting, under a thread that may still read it). The thread gives up a put into its
    full queue within 0.5 s once terminated, but its last put (the end of the epoch) waits forever for room:
    each second it is still alive, one decoded batch is dropped to make that room."""
    iterator.terminate_event.set()
    iterator.join(timeout=1.0)
    while iterator.is_alive():
        try:
            iterator.output_queue.get_nowait()
        except queue.Empty:
            pass
        iterator.join(timeout=1.0)
    iterator.close()


def follow_on_current_stream(iterator) -> None:
    """FFCV copies each batch to the GPU on a stream of its own, and its EpochIterator makes the stream that
    was current when the epoch started (`iterator.current_stream`) wait for that copy before handing the batch
    over. The batch is read on the stream current now: when that is another one (an epoch started ahead, or a
    trainer that switched streams), it waits too, on the device (no host sync)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    current = torch.cuda.current_stream()
    if current != iterator.current_stream:
        current.wait_stream(iterator.current_stream)


def _register_order() -> None:
    """FFCV accepts an order that is an instance of its TraversalOrder; SeekableOrder is one by registration
    (it needs none of the base class's state, which FFCV fills from the loader it is called with)."""
    from ffcv.traversal_order.base import TraversalOrder
    TraversalOrder.register(SeekableOrder)


def parse(options: dict | None) -> FfcvOptions:
    """The FfcvOptions of `options`; ValueError for an unknown or ill-typed one, LoaderUnavailable without FFCV."""
    require("ffcv", "ffcv", "ffcv")
    opts = parse_options(FfcvOptions, "ffcv", options)
    if opts.batches_ahead < 1:  # 0 would make FFCV's queue unbounded: its thread would overwrite untaken batches
        raise ValueError(f"option 'batches_ahead' of the 'ffcv' loader must be at least 1, got {opts.batches_ahead}")
    if opts.order not in ("random", "quasi_random"):
        raise ValueError(f"option 'order' of the 'ffcv' loader must be 'random' or 'quasi_random', got {opts.order!r}")
    return opts


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1, rand_augment: RandAugment | None = None,
          ramp: Ramp | None = None) -> FfcvLoader:
    require("ffcv", "ffcv", "ffcv")
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
    p = prelude(data, split, parse=parse, options=options, reads=BETON, batch_size=batch_size, train=train,
                rank=rank, world_size=world_size, workers=workers)
    opts, beton = p.options, p.beton

    size = (train_size(image_size, ramp, 0),) * 2  # FfcvLoader.start sets each epoch's before decoding it
    on_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []  # FFCV's CPU path skips it

    crops = []  # the train decoders, whose output_size a ramp changes per epoch

    def image_pipeline():  # a new list of new operations per output: FFCV compiles each one into its output
        if train:
            crops.append(RandomResizedCropRGBImageDecoder(size, scale=CROP_SCALE, ratio=CROP_RATIO))
            image = [crops[-1], RandomHorizontalFlip()]
        else:  # the center square of side 0.875 x the shorter side, resized: torchvision's Resize + CenterCrop
            image = [CenterCropRGBImageDecoder(size, ratio=EVAL_CROP_FRACTION)]
        return image + [ToTensor(), *on_device, ToTorchImage(channels_last=True)]

    label = [IntDecoder(), ToTensor(), Squeeze(1), *on_device]
    # The loader yields the stored fields in order (image, label), then the extra outputs (the second view).
    pipelines = {"image": image_pipeline(), "label": label}
    augment = None
    if views == 2:
        pipelines["second_view"] = PipelineSpec("image", transforms=image_pipeline())
        from ..device_augment import ColourAugment
        augment = ColourAugment(image_size).to(device)

    quasi_random = opts.order == "quasi_random" and train
    if quasi_random:
        if world_size > 1 and not (torch.distributed.is_initialized() and torch.distributed.get_rank() == rank):
            raise ValueError("the ffcv loader's 'quasi_random' order with several ranks needs torch.distributed "
                             "initialized with this rank (run under torchrun), or use order 'random'")
        inner = QuasiRandomOrder
    else:
        inner = functools.partial(RankOrder, rank=rank, world_size=world_size, train=train, seed=seed)
    _register_order()
    order = SeekableOrder(inner, batch_size=batch_size, train=train)
    where = f"{beton} (split '{split}')"
    threads = max(1, p.workers)  # 0: FFCV needs a thread
    try:
        loader = Loader(str(beton), batch_size=batch_size, num_workers=threads,
                        order=order, os_cache=opts.os_cache, distributed=world_size > 1, seed=seed,
                        drop_last=train, batches_ahead=opts.batches_ahead,
                        pipelines=pipelines)
    except (ValueError, RuntimeError, OSError, AssertionError, IndexError) as e:
        raise DatasetError(f"FFCV could not open {where}: {type(e).__name__}: {e}; {RECONVERT}") from e
    assert len(loader) == p.batches or quasi_random  # FFCV counts the contract's batches
    return FfcvLoader(loader, dtype=dtype, where=where, augment=augment, crops=tuple(crops), image_size=image_size,
                      ramp=ramp, rand_augment=rand_augment, seed=seed, rank=rank)
