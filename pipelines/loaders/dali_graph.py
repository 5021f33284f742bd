"""DALI pipeline definitions (the graph), kept apart from the PyTorch wrapper in loaders/dali.py, as DALI's
EfficientNet example does.

Two ways in (DaliOptions.reader):
- "index" (the default): an external source (dali_source.IndexedSource) hands the graph each batch's JPEG bytes
  and labels, in the contract's per-epoch order, with every random draw of the augmentation made on the host
  from (seed, epoch, rank, batch): the crop window, the flip and, for two views, the colour and blur parameters.
  The graph has no random operator, so a batch depends only on its position: the loader can seek and run on
  across epochs (`indexed_*` definitions).
- "webdataset": DALI's webdataset reader, sequential reads with a shuffle buffer, for storage where random
  access is slow; the reader's shuffle draws from its own seed (seed, epoch), the same on every rank, and every
  random operator of the augmentation from the pipeline's (seed, epoch, rank): loaders/dali.py.

The same definition runs on the GPU (decode on `mixed`: nvJPEG plus the H100's hardware JPEG decoder; resize,
flip and normalize on `gpu`) and, with `device_id=None`, on CPU operators, so the tests run the real graph.

`two_view_pipeline` (views=2) decodes each image once, in full, and cuts two SimCLR views from it, each with its
own random operators (`_simclr_view`); the second output is the second view.

RandAugment (train, views=1, `rand_augment`): `_rand_augment` runs timm's 15 operations (contract.RAND_AUGMENT_OPS,
"rand-m9-mstd0.5-inc1") on the uint8 HWC images after the crop and resize, before crop_mirror_normalize, so before
the flip (timm flips first; the flip commutes with the pointwise operations, and turns a signed geometric one's
magnitude into its negative, which is drawn as often: the same distribution; ShearY also moves from the left edge
to the right one). Per sample and layer
the operation is picked by DALI's conditional split (auto_aug.core.select: `if` on per-sample indices, so each
operator runs only on the samples that picked it) among the 15 and the identity, which stands for timm's
"not applied" (p 0.5). The draws come from the host for the index reader (dali_source.rand_augment_draws, part of
the batch's position) and from DALI's random operators, seeded by the pipeline, for webdataset (`_random_draws`).
The graphs are built with conditionals only when RandAugment is on (loaders/dali.py passes enable_conditionals), so
the graphs without it are the operators they were.

Progressive resolution (a Ramp): the index reader's source hands the epoch's side per sample ("size", fn.resize's
`size`), so one pipeline changes resolution at an epoch boundary; the webdataset reader builds a pipeline per
epoch anyway and gets the epoch's image_size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aug
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

from ..contract import (CROP_RATIO, CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_FILL, RAND_AUGMENT_MAX,
                       RAND_AUGMENT_OPS, RAND_AUGMENT_P, TWO_VIEWS, RandAugment, blur_kernel_size, eval_resize)
from .dali_source import MAGNITUDE_BINS, NOT_APPLIED

READER = "reader"  # the reader's name: the iterator asks it for the epoch size and shard padding


@dataclass(frozen=True)
class DaliOptions:
    """The knobs that matter for speed (docs/loaders.md, "Speed knobs"). `workers` sets DALI's CPU threads."""
    # "index": the contract's order read by index (seekable, a global shuffle every epoch, no shuffle buffer);
    # "webdataset": sequential shard reads through a shuffle buffer (for storage where random reads are slow)
    reader: str = "index"
    prefetch_queue_depth: int = 2  # batches the pipeline runs ahead of the trainer
    shuffle_buffer: int = 4096  # webdataset reader, train: samples the reader draws from at random (~160 MB of 40 KB JPEGs at 512 px)
    # Share of the batch the H100's hardware JPEG decoder (NVJPG) takes; nvJPEG's CUDA decoder does the rest.
    # DALI's own default is 0.65; benchmarks/loaders.py --dali-hw-load sweeps it.
    hw_decoder_load: float = 0.65
    # nvJPEG grows its buffers when a larger image arrives, which stalls the pipeline. Pre-sizing them for the
    # largest stored image avoids that; 0 means: the split's largest stored side, from the manifest
    # (loaders/dali.py's preallocate_side).
    preallocate_side: int = 0
    device_memory_padding: int = 211_025_920  # bytes of headroom per decoder buffer, DALI's ResNet-50 example
    host_memory_padding: int = 140_544_512
    read_ahead: bool = False  # ask the kernel to prefetch whole shards (helps on network file systems)
    dont_use_mmap: bool = False  # read with pread instead of mmap (some network file systems prefer it)
    # Index reader: batches its source makes ahead, on as many threads of its own (reads, JPEG headers, draws),
    # so that the thread that trains only picks them up; 0 makes each one on the thread that trains, inside
    # next() (dali_source.FeedAhead; benchmarks/dali_feed.py compares the two).
    feed_ahead: int = 4


# The options that only one reader reads: given with the other reader, they would do nothing (loaders/dali.py's
# parse() refuses them).
READER_ONLY = {"shuffle_buffer": "webdataset", "read_ahead": "webdataset", "dont_use_mmap": "webdataset",
               "feed_ahead": "index"}


def _read(shards: list[tuple[Path, Path]], *, train: bool, shard_id: int, num_shards: int, options: DaliOptions,
          reader_seed: int):
    """(jpeg bytes, int32 label) per sample. Train shuffles within a buffer, seeded by `reader_seed` and not by the
    pipeline's seed, so that the sample order stays the same on every rank while the augmentation's draws differ;
    eval pads the last batch of a shard (the iterator drops the padding, so no sample counts twice)."""
    jpegs, labels = fn.readers.webdataset(
        name=READER, paths=[str(tar) for tar, _ in shards], index_paths=[str(idx) for _, idx in shards],
        ext=["jpg", "label.i32"], dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, stick_to_shard=not train, pad_last_batch=not train,
        random_shuffle=train, initial_fill=options.shuffle_buffer,
        read_ahead=options.read_ahead, dont_use_mmap=options.dont_use_mmap, seed=reader_seed)
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


# RandAugment's operations with timm's arguments (timm/data/auto_augment.py, *_level_to_arg). An augmentation's
# mag_range spans timm's argument at magnitude 0 to 10 over DALI's 31 bins, so bin b is timm's magnitude b / 3; the
# operations whose argument timm rounds take the magnitude itself (mag_range (0, 10)) and round it as timm does.
def _posterize_mask(level: float) -> np.ndarray:
    """timm's PosterizeIncreasing keeps 4 - int(level / 10 * 4) bits: 4 at m 0, 1 from m 7.5 on, 0 at m 10,
    which old PIL turned into a black image and Pillow >= 10 refuses (ValueError). At least 1 bit, as DALI's
    own posterize: m 10 keeps 1 bit like m 9 (m 10 is 2 % of N(9, 0.5)'s draws)."""
    bits = max(1, 4 - int(level / RAND_AUGMENT_MAX * 4))
    return np.array((0xFF << (8 - bits)) & 0xFF, dtype=np.uint8)


def _solarize_threshold(level: float) -> np.ndarray:
    """timm's SolarizeIncreasing inverts pixels >= 256 - int(level / 10 * 256): none at m 0, >= 26 at m 9."""
    return np.array(256 - min(256, int(level / RAND_AUGMENT_MAX * 256)), dtype=np.int32)  # 256 needs int32


def _solarize_add_shift(level: float) -> np.ndarray:
    """timm's SolarizeAdd adds int(level / 10 * 110) to pixels below 128 (at most 127 + 110: no overflow)."""
    return np.array(min(128, int(level / RAND_AUGMENT_MAX * 110)), dtype=np.uint8)


def _filled_warp(data, warp):
    """timm fills what a geometric operation uncovers with the ImageNet mean per channel (RAND_AUGMENT_FILL);
    DALI's warps take one fill value for all channels. Warping data - fill with fill 0 and adding fill back is
    the same (interpolation is linear), in int16 (-124..151): two cheap pointwise passes on the samples that
    picked a warp."""
    fill = types.Constant(np.array(RAND_AUGMENT_FILL, dtype=np.int16), device=data.device)
    return fn.cast(warp(fn.cast(data, dtype=types.INT16) - fill) + fill, dtype=types.UINT8)


def _affine(data, matrix):
    # DALI's warp maps source to destination (inverse_map False), PIL's destination to source: for a shear or a
    # translation by t that is the one by -t, drawn as often (the sign is random)
    return _filled_warp(data, lambda d: fn.warp_affine(d, matrix=matrix, fill_value=0, inverse_map=False,
                                                       interp_type=types.INTERP_LINEAR))


@augmentation(mag_range=(0, 30), randomly_negate=True)  # degrees
def _rotate(data, angle):
    return _filled_warp(data, lambda d: fn.rotate(d, angle=angle, fill_value=0, keep_size=True,
                                                  interp_type=types.INTERP_LINEAR))


@augmentation(mag_range=(0, 0.3), randomly_negate=True, mag_to_param=aug.warp_x_param)
def _shear_x(data, shear):  # about the top-left corner, as PIL's affine transform
    return _affine(data, fn.transforms.shear(shear=shear))


@augmentation(mag_range=(0, 0.3), randomly_negate=True, mag_to_param=aug.warp_y_param)
def _shear_y(data, shear):
    return _affine(data, fn.transforms.shear(shear=shear))


@augmentation(mag_range=(0, 0.45), randomly_negate=True, mag_to_param=aug.warp_x_param)
def _translate_x(data, rel_offset, shape):  # timm's TranslateXRel: up to 0.45 of the width
    return _affine(data, fn.transforms.translation(offset=rel_offset * shape[1]))


@augmentation(mag_range=(0, 0.45), randomly_negate=True, mag_to_param=aug.warp_y_param)
def _translate_y(data, rel_offset, shape):
    return _affine(data, fn.transforms.translation(offset=rel_offset * shape[0]))


# DALI's own equalize and sharpness call the deprecated fn.experimental aliases (a warning per pipeline build)
@augmentation
def _equalize(data, _):
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aug.sharpness_kernel, param_device="auto")
def _sharpness(data, kernel):  # timm's factor 1 + m as DALI's 3 x 3 kernel: PIL's, but for a 1-px border
    return fn.filter(data, kernel)


@functools.cache
def rand_augment_suite() -> tuple:
    """timm's 15 operations in contract.RAND_AUGMENT_OPS' order (the host's indices), then the identity
    (NOT_APPLIED). Against timm's own on one image at bins 0, 15, 27 and 30 (both signs): a mean difference under
    1 / 255 (resampling, rounding), except for
    - Equalize: DALI's follows OpenCV (lookup table from the count up to and including a level), PIL's the count
      below it: ~1 / 255 apart on a smooth histogram, up to ~20 on the sample generator's flat-coloured images;
    - the geometric ones: bilinear (DALI's warps have no bicubic; DeiT's timm resamples bicubic), and a shear's or
      translation's sign turns the other way (DALI maps source to destination, PIL back), which a fair coin
      makes moot;
    - Posterize at m 10 keeps 1 bit, not 0 (_posterize_mask); Sharpness also filters the 1-px border PIL keeps;
    - every magnitude is rounded to its bin (by at most 1/6)."""
    level = (0, RAND_AUGMENT_MAX)  # the bins' magnitudes as timm's levels, for the operations that quantize them
    suite = {
        "AutoContrast": aug.auto_contrast, "Equalize": _equalize, "Invert": aug.invert, "Rotate": _rotate,
        "Posterize": aug.posterize.augmentation(mag_range=level, mag_to_param=_posterize_mask),
        "Solarize": aug.solarize.augmentation(mag_range=level, mag_to_param=_solarize_threshold),
        "SolarizeAdd": aug.solarize_add.augmentation(mag_range=level, mag_to_param=_solarize_add_shift),
        "Color": aug.color.augmentation((0, 0.9), True, aug.shift_enhance_range),
        "Contrast": aug.contrast.augmentation((0, 0.9), True, aug.shift_enhance_range),
        "Brightness": aug.brightness.augmentation((0, 0.9), True, aug.shift_enhance_range),
        "Sharpness": _sharpness,
        "ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x, "TranslateY": _translate_y}
    assert tuple(suite) == RAND_AUGMENT_OPS and len(suite) == NOT_APPLIED
    return tuple(_unconverted(op) for op in (*suite.values(), aug.identity))


def _unconverted(operation):
    """An augmentation as select calls it, hidden from AutoGraph. DALI converts auto_aug's code so that select's
    `if`s split the batch; converting each augmentation's parameter tables too (62 magnitudes each, per layer) made
    a 2-layer graph take 4-10 s to build on this 2-core CPU, 1 s without, most of it in AutoGraph's call wrappers
    (the webdataset reader builds a pipeline per epoch, a seek one per resume). The
    augmentations have no `if` on a DataNode; the operators they call still run on the split batch (DALI splits
    an operator's inputs by the conditional scope it is called in, converted or not)."""
    def apply(data, **kwargs):
        return operation(data, **kwargs)
    return do_not_convert(apply)


def _rand_augment(images, draws, *, shape):
    """RandAugment on uint8 HWC `images`: for each layer's (operation, magnitude bin, sign) per-sample DataNodes
    in `draws`, the conditional split sends each sample through the operation it drew (an identity for "not
    applied"). `shape`: the images' (height, width), a pair or a per-sample DataNode, for the translations.
    DALI's signed_bin encodes a bin and its sign as one index, 2 x bin + sign, combined once before the split."""
    for op, magnitude_bin, sign in draws:
        images = select(rand_augment_suite(), op, images, magnitude_bin=signed_bin(magnitude_bin, random_sign=sign),
                        num_magnitude_bins=MAGNITUDE_BINS, shape=shape)
    return images


def _random_draws(spec: RandAugment) -> list:
    """dali_source.rand_augment_draws with DALI's random operators (seeded by the pipeline), one set per layer."""
    draws = []
    for _ in range(spec.ops):
        op = fn.random.uniform(values=list(range(len(RAND_AUGMENT_OPS))), dtype=types.INT32)
        applied = fn.random.coin_flip(probability=RAND_AUGMENT_P, dtype=types.INT32)
        scale = (MAGNITUDE_BINS - 1) / RAND_AUGMENT_MAX  # 3 bins per unit of timm's magnitude
        magnitude = fn.random.normal(mean=spec.magnitude * scale, stddev=spec.std * scale) if spec.std else \
            types.Constant(spec.magnitude * scale, dtype=types.FLOAT)
        # the cast rounds to the nearest bin, halves up (x >= 0), as the host's draws
        magnitude_bin = fn.cast(dmath.clamp(magnitude, 0.0, float(MAGNITUDE_BINS - 1)), dtype=types.INT32)
        draws.append((applied * op + (1 - applied) * NOT_APPLIED, magnitude_bin,
                      fn.random.coin_flip(probability=0.5, dtype=types.INT32)))
    return draws


@pipeline_def(enable_conditionals=False)  # loaders/dali.py turns conditionals on with RandAugment
def train_pipeline(shards, *, image_size: int, gpu: bool, half: bool, shard_id: int, num_shards: int,
                   reader_seed: int, options: DaliOptions, preallocate_side: int,
                   rand_augment: RandAugment | None = None):
    """Random-resized-crop fused into the decode (only the crop's pixels are decoded), resize, RandAugment (when
    given), coin-flip mirror."""
    jpegs, labels = _read(shards, train=True, shard_id=shard_id, num_shards=num_shards, options=options,
                           reader_seed=reader_seed)
    images = fn.decoders.image_random_crop(
        jpegs, output_type=types.RGB, random_area=list(CROP_SCALE), random_aspect_ratio=list(CROP_RATIO),
        num_attempts=10, **_decoder_args(gpu, options, preallocate_side))
    images = fn.resize(images, device="gpu" if gpu else "cpu", resize_x=image_size, resize_y=image_size,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    if rand_augment is not None:
        images = _rand_augment(images, _random_draws(rand_augment), shape=(image_size, image_size))
    mirror = fn.random.coin_flip(probability=0.5)
    images = _normalize(images, gpu=gpu, half=half, mirror=mirror)
    return images, labels.gpu() if gpu else labels


@pipeline_def(enable_conditionals=False)
def eval_pipeline(shards, *, image_size: int, gpu: bool, half: bool, shard_id: int, num_shards: int,
                  reader_seed: int, options: DaliOptions, preallocate_side: int):
    """Resize the shorter side to image_size / 0.875, then center-crop, as torchvision's eval transform."""
    jpegs, labels = _read(shards, train=False, shard_id=shard_id, num_shards=num_shards, options=options,
                           reader_seed=reader_seed)
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(gpu, options, preallocate_side))
    images = fn.resize(images, device="gpu" if gpu else "cpu", resize_shorter=eval_resize(image_size),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalize(images, gpu=gpu, half=half, crop=image_size)
    return images, labels.gpu() if gpu else labels


@pipeline_def(enable_conditionals=True)  # the blur runs only on the views that draw it (an `if` per sample)
def two_view_pipeline(shards, *, image_size: int, gpu: bool, half: bool, shard_id: int, num_shards: int,
                      reader_seed: int, options: DaliOptions, preallocate_side: int):
    """Two SimCLR views per sample. The image is decoded once, whole: image_random_crop's fused decode would
    decode it twice, once per crop."""
    jpegs, labels = _read(shards, train=True, shard_id=shard_id, num_shards=num_shards, options=options,
                           reader_seed=reader_seed)
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(gpu, options, preallocate_side))
    first, second = (_simclr_view(images, image_size=image_size, gpu=gpu, half=half) for _ in range(2))
    return first, second, labels.gpu() if gpu else labels


def _simclr_view(images, *, image_size: int, gpu: bool, half: bool):
    """One view (contract.TWO_VIEWS): random-resized-crop, colour jitter (p 0.8), grayscale (p 0.2), blur
    (p 0.5), then flip (p 0.5) and normalize in one operator; the flip commutes with the rest (pointwise colour
    and a symmetric blur). Every random draw is per sample. A skipped jitter or grayscale is color_twist with
    parameters that change nothing (factors 1, hue 0): one operator instead of a branch per operation."""
    device = "gpu" if gpu else "cpu"
    view = fn.random_resized_crop(images, device=device, size=(image_size, image_size), random_area=list(CROP_SCALE),
                                  random_aspect_ratio=list(CROP_RATIO), num_attempts=10,
                                  interp_type=types.INTERP_LINEAR, antialias=True)
    jitter = fn.random.coin_flip(probability=TWO_VIEWS.jitter_p, dtype=types.INT32)  # 0 or 1: a factor below
    keep_colour = 1 - fn.random.coin_flip(probability=TWO_VIEWS.gray_p, dtype=types.INT32)

    def factor(strength: float):  # torchvision's ColorJitter: uniform in [1 - s, 1 + s], 1 when not jittered
        return 1 + jitter * fn.random.uniform(range=[-strength, strength])
    # DALI's hue is in degrees, torchvision's in turns (0.1 = 36 degrees). DALI's contrast scales around mid-grey,
    # torchvision's around the image's mean grey: the same spread of factors, a slightly different centre.
    view = fn.color_twist(view, device=device, brightness=factor(TWO_VIEWS.brightness),
                          contrast=factor(TWO_VIEWS.contrast),
                          saturation=factor(TWO_VIEWS.saturation) * keep_colour,  # saturation 0 is grayscale
                          hue=jitter * fn.random.uniform(range=[-360 * TWO_VIEWS.hue, 360 * TWO_VIEWS.hue]))
    if fn.random.coin_flip(probability=TWO_VIEWS.blur_p):
        view = fn.gaussian_blur(view, device=device, window_size=blur_kernel_size(image_size),
                                sigma=fn.random.uniform(range=list(TWO_VIEWS.blur_sigma)))
    return _normalize(view, gpu=gpu, half=half, mirror=fn.random.coin_flip(probability=TWO_VIEWS.flip_p))


# the rest are FLOAT (among them "size", fn.resize's); image_slice takes an absolute window as integers
_SOURCE_TYPES = {"jpegs": types.UINT8, "labels": types.INT32, "crop_start": types.INT32, "crop_shape": types.INT32,
                 "mirror": types.INT32, "blur": types.BOOL, "rand_augment": types.INT32}


def _external(source):
    """One DataNode per IndexedSource output (source.outputs), by name."""
    nodes = fn.external_source(source=source, num_outputs=len(source.outputs), batch=True, batch_info=True,
                               dtype=[_SOURCE_TYPES.get(name.rstrip("01"), types.FLOAT) for name in source.outputs])
    return dict(zip(source.outputs, nodes))


@pipeline_def(enable_conditionals=False)  # loaders/dali.py turns conditionals on with RandAugment
def indexed_train_pipeline(source, *, image_size: int, gpu: bool, half: bool, options: DaliOptions,
                           preallocate_side: int, rand_augment: RandAugment | None = None):
    """The host's crop window decoded alone (ROI decode: only the crop's pixels), resized (to the host's side
    with a ramp), RandAugmented by the host's draws (when given), mirrored by the host's coin."""
    data = _external(source)
    images = fn.decoders.image_slice(data["jpegs"], start=data["crop_start"], shape=data["crop_shape"],
                                     axis_names="WH", output_type=types.RGB,
                                     **_decoder_args(gpu, options, preallocate_side))
    side = {"size": data["size"]} if "size" in data else {"resize_x": image_size, "resize_y": image_size}
    images = fn.resize(images, device="gpu" if gpu else "cpu", **side, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    if rand_augment is not None:
        draws = data["rand_augment"]  # per sample: layers x (operation, magnitude bin, sign)
        images = _rand_augment(images, [(draws[layer, 0], draws[layer, 1], draws[layer, 2])
                                        for layer in range(rand_augment.ops)],
                               shape=data.get("size", (image_size, image_size)))
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
