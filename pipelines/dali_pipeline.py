"""DALI pipeline definitions (the graph), kept apart from the PyTorch wrapper in dali_loader.py, as DALI's
EfficientNet example does.

Two ways in (DaliOptions.reader):
- "index" (the default): an external source (dali_source.IndexedSource) hands the graph each batch's JPEG bytes
  and labels, in the contract's per-epoch order, with every random draw of the augmentation made on the host
  from (seed, epoch, rank, batch): the crop window, the flip and, for two views, the colour and blur parameters.
  The graph has no random operator, so a batch depends only on its position: the loader can seek and run on
  across epochs (`indexed_*` definitions).
- "webdataset": DALI's webdataset reader, sequential reads with a shuffle buffer, for storage where random
  access is slow; every random operator draws from the pipeline's seed (dali_loader: seed, epoch).

The same definition runs on the GPU (decode on `mixed`: nvJPEG plus the H100's hardware JPEG decoder; resize,
flip and normalize on `gpu`) and, with `device_id=None`, on CPU operators, so the tests run the real graph.

`two_view_pipeline` (views=2) decodes each image once, in full, and cuts two SimCLR views from it, each with its
own random operators (`_simclr_view`); the second output is the second view.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types

from .contract import (CROP_RATIO, CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, SSL_BLUR_P, SSL_BLUR_SIGMA, SSL_BRIGHTNESS,
                       SSL_CONTRAST, SSL_FLIP_P, SSL_GRAY_P, SSL_HUE, SSL_JITTER_P, SSL_SATURATION, blur_kernel_size,
                       eval_resize)

READER = "reader"  # the reader's name: the iterator asks it for the epoch size and shard padding


@dataclass(frozen=True)
class DaliOptions:
    """The knobs that matter for speed (README, "DALI loader"). `workers` sets DALI's CPU threads."""
    # "index": the contract's order read by index (seekable, a global shuffle every epoch, no shuffle buffer);
    # "webdataset": sequential shard reads through a shuffle buffer (for storage where random reads are slow)
    reader: str = "index"
    prefetch_queue_depth: int = 2  # batches the pipeline runs ahead of the trainer
    shuffle_buffer: int = 4096  # webdataset reader, train: samples the reader draws from at random (~160 MB of 40 KB JPEGs at 512 px)
    # Share of the batch the H100's hardware JPEG decoder (NVJPG) takes; nvJPEG's CUDA decoder does the rest.
    # DALI's own default is 0.65; benchmarks/loaders.py --dali-hw-load sweeps it.
    hw_decoder_load: float = 0.65
    # nvJPEG grows its buffers when a larger image arrives, which stalls the pipeline. Pre-sizing them for the
    # largest stored image avoids that; 0 means: take it from the manifest's --max-resolution.
    preallocate_side: int = 0
    device_memory_padding: int = 211_025_920  # bytes of headroom per decoder buffer, DALI's ResNet-50 example
    host_memory_padding: int = 140_544_512
    read_ahead: bool = False  # ask the kernel to prefetch whole shards (helps on network file systems)
    dont_use_mmap: bool = False  # read with pread instead of mmap (some network file systems prefer it)


def _read(shards: list[tuple[Path, Path]], *, train: bool, shard_id: int, num_shards: int, options: DaliOptions):
    """(jpeg bytes, int32 label) per sample. Train shuffles within a buffer; eval pads the last batch of a
    shard (the iterator drops the padding, so no sample counts twice)."""
    jpegs, labels = fn.readers.webdataset(
        name=READER, paths=[str(tar) for tar, _ in shards], index_paths=[str(idx) for _, idx in shards],
        ext=["jpg", "label.i32"], dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, stick_to_shard=not train, pad_last_batch=not train,
        random_shuffle=train, initial_fill=options.shuffle_buffer,
        read_ahead=options.read_ahead, dont_use_mmap=options.dont_use_mmap)
    return jpegs, labels


def _decoder_args(gpu: bool, options: DaliOptions, preallocate_side: int) -> dict:
    if not gpu:
        return {"device": "cpu"}
    args = {"device": "mixed", "hw_decoder_load": options.hw_decoder_load,
            "device_memory_padding": options.device_memory_padding,
            "host_memory_padding": options.host_memory_padding}
    if preallocate_side:
        args |= {"preallocate_width_hint": preallocate_side, "preallocate_height_hint": preallocate_side}
    return args


def _normalize(images, *, gpu: bool, half: bool, crop: int | None = None, mirror=None):
    """uint8 HWC -> normalized HWC. HWC is what makes the channels_last NCHW view free in the wrapper."""
    args = {"crop": (crop, crop), "crop_pos_x": 0.5, "crop_pos_y": 0.5} if crop else {}
    return fn.crop_mirror_normalize(
        images, device="gpu" if gpu else "cpu", dtype=types.FLOAT16 if half else types.FLOAT, output_layout="HWC",
        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD], mirror=mirror, **args)


@pipeline_def(enable_conditionals=False)
def train_pipeline(shards, *, image_size: int, gpu: bool, half: bool, shard_id: int, num_shards: int,
                   options: DaliOptions, preallocate_side: int):
    """Random-resized-crop fused into the decode (only the crop's pixels are decoded), resize, coin-flip mirror."""
    jpegs, labels = _read(shards, train=True, shard_id=shard_id, num_shards=num_shards, options=options)
    images = fn.decoders.image_random_crop(
        jpegs, output_type=types.RGB, random_area=list(CROP_SCALE), random_aspect_ratio=list(CROP_RATIO),
        num_attempts=10, **_decoder_args(gpu, options, preallocate_side))
    images = fn.resize(images, device="gpu" if gpu else "cpu", resize_x=image_size, resize_y=image_size,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    mirror = fn.random.coin_flip(probability=0.5)
    images = _normalize(images, gpu=gpu, half=half, mirror=mirror)
    return images, labels.gpu() if gpu else labels


@pipeline_def(enable_conditionals=False)
def eval_pipeline(shards, *, image_size: int, gpu: bool, half: bool, shard_id: int, num_shards: int,
                  options: DaliOptions, preallocate_side: int):
    """Resize the shorter side to image_size / 0.875, then center-crop, as torchvision's eval transform."""
    jpegs, labels = _read(shards, train=False, shard_id=shard_id, num_shards=num_shards, options=options)
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(gpu, options, preallocate_side))
    images = fn.resize(images, device="gpu" if gpu else "cpu", resize_shorter=eval_resize(image_size),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalize(images, gpu=gpu, half=half, crop=image_size)
    return images, labels.gpu() if gpu else labels


@pipeline_def(enable_conditionals=True)  # the blur runs only on the views that draw it (an `if` per sample)
def two_view_pipeline(shards, *, image_size: int, gpu: bool, half: bool, shard_id: int, num_shards: int,
                      options: DaliOptions, preallocate_side: int):
    """Two SimCLR views per sample. The image is decoded once, whole: image_random_crop's fused decode would
    decode it twice, once per crop."""
    jpegs, labels = _read(shards, train=True, shard_id=shard_id, num_shards=num_shards, options=options)
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(gpu, options, preallocate_side))
    first, second = (_simclr_view(images, image_size=image_size, gpu=gpu, half=half) for _ in range(2))
    return first, second, labels.gpu() if gpu else labels


def _simclr_view(images, *, image_size: int, gpu: bool, half: bool):
    """One view (contract.SSL_*): random-resized-crop, colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5),
    then flip (p 0.5) and normalize in one operator; the flip commutes with the rest (pointwise colour and a
    symmetric blur). Every random draw is per sample. A skipped jitter or grayscale is color_twist with
    parameters that change nothing (factors 1, hue 0): one operator instead of a branch per operation."""
    device = "gpu" if gpu else "cpu"
    view = fn.random_resized_crop(images, device=device, size=(image_size, image_size), random_area=list(CROP_SCALE),
                                  random_aspect_ratio=list(CROP_RATIO), num_attempts=10,
                                  interp_type=types.INTERP_LINEAR, antialias=True)
    jitter = fn.random.coin_flip(probability=SSL_JITTER_P, dtype=types.INT32)  # 0 or 1: a factor below
    keep_colour = 1 - fn.random.coin_flip(probability=SSL_GRAY_P, dtype=types.INT32)

    def factor(strength: float):  # torchvision's ColorJitter: uniform in [1 - s, 1 + s], 1 when not jittered
        return 1 + jitter * fn.random.uniform(range=[-strength, strength])
    # DALI's hue is in degrees, torchvision's in turns (0.1 = 36 degrees). DALI's contrast scales around mid-grey,
    # torchvision's around the image's mean grey: the same spread of factors, a slightly different centre.
    view = fn.color_twist(view, device=device, brightness=factor(SSL_BRIGHTNESS), contrast=factor(SSL_CONTRAST),
                          saturation=factor(SSL_SATURATION) * keep_colour,  # saturation 0 is grayscale
                          hue=jitter * fn.random.uniform(range=[-360 * SSL_HUE, 360 * SSL_HUE]))
    if fn.random.coin_flip(probability=SSL_BLUR_P):
        view = fn.gaussian_blur(view, device=device, window_size=blur_kernel_size(image_size),
                                sigma=fn.random.uniform(range=list(SSL_BLUR_SIGMA)))
    return _normalize(view, gpu=gpu, half=half, mirror=fn.random.coin_flip(probability=SSL_FLIP_P))


# the rest are FLOAT; image_slice takes an absolute window as integers
_SOURCE_TYPES = {"jpegs": types.UINT8, "labels": types.INT32, "crop_start": types.INT32, "crop_shape": types.INT32,
                 "mirror": types.INT32, "blur": types.BOOL}


def _external(source):
    """One DataNode per IndexedSource output (source.outputs), by name."""
    nodes = fn.external_source(source=source, num_outputs=len(source.outputs), batch=True, batch_info=True,
                               dtype=[_SOURCE_TYPES.get(name.rstrip("01"), types.FLOAT) for name in source.outputs])
    return dict(zip(source.outputs, nodes))


@pipeline_def(enable_conditionals=False)
def indexed_train_pipeline(source, *, image_size: int, gpu: bool, half: bool, options: DaliOptions,
                           preallocate_side: int):
    """The host's crop window decoded alone (ROI decode: only the crop's pixels), resized, mirrored by the
    host's coin."""
    data = _external(source)
    images = fn.decoders.image_slice(data["jpegs"], start=data["crop_start"], shape=data["crop_shape"],
                                     axis_names="WH", output_type=types.RGB,
                                     **_decoder_args(gpu, options, preallocate_side))
    images = fn.resize(images, device="gpu" if gpu else "cpu", resize_x=image_size, resize_y=image_size,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalize(images, gpu=gpu, half=half, mirror=data["mirror"])
    return images, data["labels"].gpu() if gpu else data["labels"]


@pipeline_def(enable_conditionals=False)
def indexed_eval_pipeline(source, *, image_size: int, gpu: bool, half: bool, options: DaliOptions,
                          preallocate_side: int):
    """eval_pipeline's resize and center crop, fed in the contract's order (the last batch may be smaller)."""
    data = _external(source)
    images = fn.decoders.image(data["jpegs"], output_type=types.RGB, **_decoder_args(gpu, options, preallocate_side))
    images = fn.resize(images, device="gpu" if gpu else "cpu", resize_shorter=eval_resize(image_size),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalize(images, gpu=gpu, half=half, crop=image_size)
    return images, data["labels"].gpu() if gpu else data["labels"]


@pipeline_def(enable_conditionals=True)  # the blur runs only on the views whose host coin says so
def indexed_two_view_pipeline(source, *, image_size: int, gpu: bool, half: bool, options: DaliOptions,
                              preallocate_side: int):
    """Two SimCLR views per sample from one full decode, each view's crop, colour, blur and flip drawn on the
    host (dali_source.simclr_colour)."""
    data = _external(source)
    images = fn.decoders.image(data["jpegs"], output_type=types.RGB, **_decoder_args(gpu, options, preallocate_side))
    device = "gpu" if gpu else "cpu"
    views = []
    for v in range(2):
        view = fn.resize(images, device=device, size=[image_size, image_size], roi_start=data[f"roi_start{v}"],
                         roi_end=data[f"roi_end{v}"], interp_type=types.INTERP_LINEAR, antialias=True)
        view = fn.color_twist(view, device=device, brightness=data[f"brightness{v}"],
                              contrast=data[f"contrast{v}"], saturation=data[f"saturation{v}"], hue=data[f"hue{v}"])
        if data[f"blur{v}"]:
            view = fn.gaussian_blur(view, device=device, window_size=blur_kernel_size(image_size),
                                    sigma=data[f"sigma{v}"])
        views.append(_normalize(view, gpu=gpu, half=half, mirror=data[f"mirror{v}"]))
    return views[0], views[1], data["labels"].gpu() if gpu else data["labels"]
