"""pipelines/rand_augment.py: per-sample draws at timm's rates, each operation against timm's own (on Pillow),
the magnitude-0 identity, reproducibility by batch position, the output's layout, and no host-device sync."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.contract import RAND_AUGMENT_FILL, RAND_AUGMENT_OPS, RandAugment
from pipelines.rand_augment import (IDENTITY_AT_ZERO, NONE, OPS, apply_layer, batch_generator, draw, op_indices,
                                    rand_augment)

CPU = torch.device("cpu")
DEIT = RandAugment()  # rand-m9-mstd0.5-inc1
# Our names -> timm's increasing-set names (timm.data.auto_augment._RAND_INCREASING_TRANSFORMS).
TIMM_NAMES = {"Posterize": "PosterizeIncreasing", "Solarize": "SolarizeIncreasing", "Color": "ColorIncreasing",
              "Contrast": "ContrastIncreasing", "Brightness": "BrightnessIncreasing",
              "Sharpness": "SharpnessIncreasing", "TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel"}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
# Pillow samples in float64, we in float32: where the exact value is an integer or a hair from one (often, e.g. a
# weight of 0.65 times a difference of 20), the two can truncate to neighbouring levels. Seen: at most 1.7 % of the
# pixels (ShearY, TranslateY at magnitude 10), never by more than 1.
GEOMETRIC_MAX_DIFFERENT = 0.03


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The images here are small (24-64 px): intra-op threads only add OpenMP barriers, and on a busy 2-core
    machine each barrier can wait for a time slice (seen: 1.3 s instead of 0.03 s for one call on 32 images)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def noise(n, height=32, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


def sample_images():
    """4 small images (37 x 45, not square) that exercise the operations differently: noise, a narrow range
    (AutoContrast and Equalize stretch it), a horizontal gradient, and smooth colour blobs."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 37, 45, 3), dtype=np.uint8)
    images[1] = images[1] // 4 + 60
    images[2] = np.linspace(0, 255, 45, dtype=np.uint8)[None, :, None]
    yy, xx = np.mgrid[0:37, 0:45]
    images[3] = np.stack([128 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7) for c in range(3)], -1).astype(np.uint8)
    return images


# --- the draws ----------------------------------------------------------------------------------------------

def test_draws_are_per_sample_at_timm_rates():
    """30,000 images, 2 layers, a fixed seed: each of the 15 operations drawn 1/15 of the time in each layer (within
    10 %: 4.6 standard deviations), independently across layers; applied and sign each p 0.5; magnitudes
    N(9, 0.5) clipped to [0, 10]."""
    n = 30_000
    draws = draw(DEIT, n, torch.Generator().manual_seed(0), CPU)
    assert draws.op.shape == draws.applied.shape == draws.magnitude.shape == draws.sign.shape == (2, n)
    counts = torch.stack([torch.bincount(layer, minlength=15) for layer in draws.op])
    assert counts.shape == (2, 15)
    assert ((counts - n / 15).abs() < 0.1 * n / 15).all(), counts
    assert abs((draws.op[0] == draws.op[1]).float().mean().item() - 1 / 15) < 0.01  # layers drawn apart
    assert abs(draws.applied.float().mean().item() - 0.5) < 0.01
    assert set(draws.sign.unique().tolist()) == {-1.0, 1.0} and abs((draws.sign > 0).float().mean() - 0.5) < 0.01
    assert 0 <= draws.magnitude.min() and draws.magnitude.max() <= 10
    clipped = np.clip(np.random.default_rng(0).normal(9, 0.5, 1_000_000), 0, 10)  # timm: random.gauss, clipped
    assert abs(draws.magnitude.mean().item() - clipped.mean()) < 0.01
    assert abs(draws.magnitude.std().item() - clipped.std()) < 0.01
    exact = draw(RandAugment(magnitude=7, std=0), 100, torch.Generator().manual_seed(0), CPU)
    assert (exact.magnitude == 7).all()


def test_op_set_restricts_the_draws():
    ops = draw(DEIT, 3000, torch.Generator().manual_seed(0), CPU, op_set=("Rotate", "Invert")).op
    assert set(ops.unique().tolist()) == {OPS["Rotate"], OPS["Invert"]}
    with pytest.raises(ValueError, match="Rotation"):
        op_indices(("Rotation",), CPU)


def test_one_image_repeated_is_augmented_differently_per_sample():
    """256 copies of one image: a quarter run no operation in either layer (p 0.5 twice), the others are changed
    in many different ways (continuous magnitudes, signs, 15 operations)."""
    image = noise(1)
    out = rand_augment(image.expand(256, -1, -1, -1), DEIT, batch_generator(CPU, 0, 0, 0, 0)).reshape(256, -1)
    unchanged = (out == image.reshape(1, -1)).all(1).sum().item()
    assert 40 <= unchanged <= 100, unchanged
    assert torch.unique(out, dim=0).shape[0] >= 100


def test_rand_augment_applies_the_draws_layer_by_layer():
    """rand_augment equals apply_layer run by hand on draw's numbers, layer after layer, each image's layer
    applied only where its `applied` is set."""
    images, spec = noise(32), RandAugment(ops=3)
    out = rand_augment(images, spec, torch.Generator().manual_seed(3))
    draws = draw(spec, 32, torch.Generator().manual_seed(3), CPU)
    x = images.float()
    for layer in range(spec.ops):
        op = torch.where(draws.applied[layer], draws.op[layer], NONE)
        x = apply_layer(x, op, draws.magnitude[layer], draws.sign[layer])
    assert torch.equal(out, x.to(torch.uint8))


# --- the operations -------------------------------------------------------------------------------------------

def test_magnitude_zero_is_the_identity():
    """Magnitude 0, std 0: every magnitude-driven operation (IDENTITY_AT_ZERO) leaves every pixel as it was, the
    geometric ones through the sampler too. With the whole set it is not the identity: AutoContrast, Equalize and
    Invert ignore the magnitude, and timm's Posterize keeps 4 bits at 0."""
    images = noise(64, 33, 40)
    spec = RandAugment(ops=3, magnitude=0, std=0)
    out = rand_augment(images, spec, torch.Generator().manual_seed(0), op_set=IDENTITY_AT_ZERO)
    assert torch.equal(out, images)
    assert not torch.equal(rand_augment(images, spec, torch.Generator().manual_seed(0)), images)


def timm_reference(name, magnitude, sign, image, monkeypatch):
    """timm's AugmentOp (its level-to-argument mapping and its Pillow operation) at this magnitude and sign."""
    import timm.data.auto_augment as timm_aa
    op = timm_aa.AugmentOp(TIMM_NAMES.get(name, name), prob=1.0, magnitude=magnitude,
                           hparams={"img_mean": RAND_AUGMENT_FILL, "interpolation": Image.BILINEAR})
    monkeypatch.setattr(random, "random", lambda: 0.9 if sign < 0 else 0.1)  # timm negates when > 0.5
    return np.asarray(op(Image.fromarray(image)))


@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_each_operation_matches_timm(name, monkeypatch):
    """Each operation forced on 4 images at magnitudes 9 (both signs), 4.3 and 10, against timm's on Pillow:
    equal for the pointwise and enhancement operations; for the geometric ones no pixel off by more than 1 and at
    most GEOMETRIC_MAX_DIFFERENT of them off at all."""
    images = sample_images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()
    n = len(images)
    for magnitude, sign in [(9.0, 1.0), (9.0, -1.0), (4.3, 1.0), (10.0, -1.0)]:
        out = apply_layer(x, torch.full((n,), OPS[name]), torch.full((n,), magnitude), torch.full((n,), sign))
        ours = out.permute(0, 2, 3, 1).to(torch.int64).numpy()
        if name == "Posterize" and magnitude == 10:  # 0 bits: timm hands 0 to Pillow, which raises
            assert (ours == 0).all()
            continue
        reference = np.stack([timm_reference(name, magnitude, sign, image, monkeypatch) for image in images])
        difference = np.abs(ours - reference)
        where = f"{name} at magnitude {magnitude}, sign {sign}"
        if name in GEOMETRIC:
            assert difference.max() <= 1, where
            assert (difference > 0).mean() <= GEOMETRIC_MAX_DIFFERENT, where
        else:
            assert difference.max() == 0, f"{where}: {(difference > 0).sum()} pixels differ"
        assert not np.array_equal(reference, images), f"{where}: timm changed nothing, so this checked nothing"


def test_operations_change_only_the_images_that_drew_them():
    """One layer where every other image drew Sharpness (the one with a neighbourhood) and the rest drew nothing
    or an operation that is not applied: the latter come back exactly."""
    images = noise(8).float()
    op = torch.tensor([OPS["Sharpness"], NONE] * 4)
    out = apply_layer(images, op, torch.full((8,), 9.0), torch.ones(8))
    assert torch.equal(out[1::2], images[1::2])
    assert not torch.equal(out[0::2], images[0::2])


# --- the API: reproducibility, layout, device ---------------------------------------------------------------

def test_batch_position_decides_the_draws():
    images = noise(16)
    first = rand_augment(images, DEIT, batch_generator(CPU, seed=0, epoch=1, rank=0, batch=5))
    assert torch.equal(first, rand_augment(images, DEIT, batch_generator(CPU, seed=0, epoch=1, rank=0, batch=5)))
    for other in [dict(seed=1, epoch=1, rank=0, batch=5), dict(seed=0, epoch=2, rank=0, batch=5),
                  dict(seed=0, epoch=1, rank=1, batch=5), dict(seed=0, epoch=1, rank=0, batch=6)]:
        assert not torch.equal(first, rand_augment(images, DEIT, batch_generator(CPU, **other))), other


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_output_is_uint8_channels_last_on_the_input_device(layout):
    images = noise(8, 24, 40)
    given = images.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else images
    out = rand_augment(given, DEIT, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.device == images.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, rand_augment(images, DEIT, torch.Generator().manual_seed(0)))  # layout-independent


# --- no host-device sync --------------------------------------------------------------------------------------

def test_makes_no_host_tensor_after_the_first_call():
    """tests/test_no_sync.py's recorder: no tensor made from host data, no blocking copy, in calls 2-4 (the
    first makes the fill constant and the op-set indices, once per device)."""
    from test_no_sync import host_tensors
    images = noise(8)
    rand_augment(images, DEIT, batch_generator(CPU, 0, 0, 0, 0))
    with host_tensors() as calls:
        for batch in range(1, 4):
            rand_augment(images, DEIT, batch_generator(CPU, 0, 0, 0, batch))
    assert calls == []


def test_a_layer_reads_nothing_back_from_its_device():
    """On the meta device every read of a value raises (.item(), bool(), nonzero, boolean-mask indexing): the
    reads that wait for the GPU on a CUDA batch. (torch.rand cannot take a generator on meta, so the layer.)"""
    meta = torch.device("meta")
    x = torch.empty(8, 3, 32, 32, device=meta)
    out = apply_layer(x, torch.zeros(8, dtype=torch.int64, device=meta), torch.empty(8, device=meta),
                      torch.empty(8, device=meta))
    assert out.shape == x.shape and out.device == meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_does_not_sync_and_matches_the_cpu():
    """Calls 2-4 on a CUDA batch under torch.cuda.set_sync_debug_mode("error") (any synchronizing call raises);
    then each layer's CUDA result against the CPU's for the same draws (transcendentals may differ by an ulp)."""
    cuda = torch.device("cuda", 0)
    images = noise(64, 64, 64).to(cuda)
    rand_augment(images, DEIT, batch_generator(cuda, 0, 0, 0, 0))
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [rand_augment(images, DEIT, batch_generator(cuda, 0, 0, 0, batch)) for batch in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode(before)
    assert all(out.is_contiguous(memory_format=torch.channels_last) and out.device == images.device for out in outs)
    draws = draw(DEIT, 64, torch.Generator().manual_seed(0), CPU)
    op = torch.where(draws.applied[0], draws.op[0], NONE)
    x = images.cpu().float()
    on_cpu = apply_layer(x, op, draws.magnitude[0], draws.sign[0])
    on_cuda = apply_layer(x.to(cuda), op.to(cuda), draws.magnitude[0].to(cuda), draws.sign[0].to(cuda)).cpu()
    difference = (on_cpu - on_cuda).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3
