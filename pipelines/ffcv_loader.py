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
`distributed=True` asks.

Two views (views=2): a second output decodes the same image field again with its own random-resized-crop and
flip (a `PipelineSpec` whose source is "image"); the colour jitter, grayscale and blur, which FFCV does not
have, run in torch on the device on each view (device_augment.py), before the normalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .contract import (CROP_RATIO, CROP_SCALE, EVAL_CROP_FRACTION, batches_per_epoch, default_workers,
                       normalize, parse_options, rank_indices, require)
from .formats.manifest import RECONVERT, DatasetError, beton_file, check_files, load_manifest, split_info


@dataclass(frozen=True)
class FfcvOptions:
    """The knobs that matter for speed (README, "FFCV loader"). `workers` sets FFCV's decode threads."""
    batches_ahead: int = 3  # batches decoded ahead of the trainer
    # True: the .beton sits in the page cache, shared by all ranks (ffcv-imagenet's in_memory=1); fits when
    # RAM holds it (ImageNet at --max-resolution 512 is ~60 GB). False: each process reads pages itself.
    os_cache: bool = True
    order: str = "random"  # "random": the contract's order; "quasi_random": FFCV's page-aware shuffle


class RankOrder:
    """An FFCV traversal order yielding contract.rank_indices. FFCV's Loader calls an order *instance* with
    itself (`order(loader)`), so this object is that callable and the order it returns."""

    def __init__(self, *, rank: int, world_size: int, train: bool, seed: int):
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, seed
        self.samples = 0

    def __call__(self, loader) -> RankOrder:
        self.samples = len(loader.indices)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return rank_indices(self.samples, rank=self.rank, world_size=self.world_size, train=self.train,
                            seed=self.seed, epoch=epoch)


class FfcvLoader:
    def __init__(self, loader, *, dtype: torch.dtype, where: str, augment: torch.nn.Module | None = None):
        self.loader, self.dtype, self.where = loader, dtype, where
        self.augment = augment  # views=2: device_augment.ColourAugment, run on each view
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.loader.next_epoch = self.epoch  # FFCV would move on by itself; every loader repeats until set_epoch
        try:
            for images, labels, *second_view in self.loader:
                # FFCV reuses its output buffers batches_ahead batches later: normalize makes new images, and
                # the labels are copied, so a batch the trainer keeps stays intact.
                labels = labels.to(torch.int64, copy=True)
                if not second_view:
                    yield normalize(images, self.dtype), labels
                else:  # uint8 -> [0, 1] float, colour-augmented, normalized: new tensors as well
                    yield tuple(normalize(self.augment(view.float().div_(255)), self.dtype)
                                for view in (images, *second_view)), labels
        except (ValueError, RuntimeError, OSError) as e:
            raise DatasetError(f"FFCV could not read {self.where}: {e}; {RECONVERT}") from e


def _register_rank_order() -> None:
    """FFCV accepts an order that is an instance of its TraversalOrder; RankOrder is one by registration
    (it needs none of the base class's state, which FFCV fills from the loader it is called with)."""
    from ffcv.traversal_order.base import TraversalOrder
    TraversalOrder.register(RankOrder)


def build(data: Path, split: str, *, batch_size: int, image_size: int, train: bool, device: torch.device,
          dtype: torch.dtype, rank: int, world_size: int, seed: int, workers: int | None,
          options: dict | None = None, views: int = 1) -> FfcvLoader:
    require("ffcv", "ffcv", "ffcv")
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
    opts = parse_options(FfcvOptions, "ffcv", options)
    if opts.order not in ("random", "quasi_random"):
        raise ValueError(f"option 'order' of the 'ffcv' loader must be 'random' or 'quasi_random', got {opts.order!r}")
    manifest = load_manifest(data)
    beton = beton_file(data, manifest, split)
    check_files(data, manifest, [beton])
    samples = split_info(data, manifest, split)["samples"]

    size = (image_size, image_size)
    on_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []  # FFCV's CPU path skips it

    def image_pipeline():  # a new list of new operations per output: FFCV compiles each one into its output
        if train:
            image = [RandomResizedCropRGBImageDecoder(size, scale=CROP_SCALE, ratio=CROP_RATIO),
                     RandomHorizontalFlip()]
        else:  # the center square of side 0.875 x the shorter side, resized: torchvision's Resize + CenterCrop
            image = [CenterCropRGBImageDecoder(size, ratio=EVAL_CROP_FRACTION)]
        return image + [ToTensor(), *on_device, ToTorchImage(channels_last=True)]

    label = [IntDecoder(), ToTensor(), Squeeze(1), *on_device]
    # The loader yields the stored fields in order (image, label), then the extra outputs (the second view).
    pipelines = {"image": image_pipeline(), "label": label}
    augment = None
    if views == 2:
        pipelines["second_view"] = PipelineSpec("image", transforms=image_pipeline())
        from .device_augment import ColourAugment
        augment = ColourAugment(image_size).to(device)

    if opts.order == "quasi_random" and train:
        if world_size > 1 and not (torch.distributed.is_initialized() and torch.distributed.get_rank() == rank):
            raise ValueError("the ffcv loader's 'quasi_random' order with several ranks needs torch.distributed "
                             "initialized with this rank (run under torchrun), or use order 'random'")
        order = OrderOption.QUASI_RANDOM
    else:
        _register_rank_order()
        order = RankOrder(rank=rank, world_size=world_size, train=train, seed=seed)
    where = f"{beton} (split '{split}')"
    threads = default_workers(world_size) if workers is None else max(1, workers)  # 0: FFCV needs a thread
    try:
        loader = Loader(str(beton), batch_size=batch_size, num_workers=threads,
                        order=order, os_cache=opts.os_cache, distributed=world_size > 1, seed=seed,
                        drop_last=train, batches_ahead=opts.batches_ahead,
                        pipelines=pipelines)
    except (ValueError, RuntimeError, OSError, AssertionError, IndexError) as e:
        raise DatasetError(f"FFCV could not open {where}: {type(e).__name__}: {e}; {RECONVERT}") from e
    per_rank = len(rank_indices(samples, rank=rank, world_size=world_size, train=train, seed=seed, epoch=0))
    assert len(loader) == batches_per_epoch(per_rank, batch_size, train) or order == OrderOption.QUASI_RANDOM
    return FfcvLoader(loader, dtype=dtype, where=where, augment=augment)
