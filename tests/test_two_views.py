"""Two augmented views per sample (`views=2`, pipelines/contract.py) for self-supervised pre-training, on the
CPU, for every loader kind; and the on-device colour augmentation (pipelines/device_augment.py) on its own.

Each kind's two-view loader is built and read once per module (`two_view_run`): FFCV compiles each new
Loader with numba on its first epoch (~8 s, ~15 s for the first in a process).
"""
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pytest
import torch

from pipelines import build_loader
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, check_views_batch, rank_indices
from test_pipelines import (BATCH, CPU, KINDS, TRAIN_SIZE, collect_garbage_at_the_end, loader,  # noqa: F401
                            normalization_problem, stored_labels)

# numba's Dispatcher finalizer raises KeyError when FFCV's compiled pipelines are garbage-collected (see
# test_pipelines).
pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")

REAL = ["dali", "ffcv", "torchvision"]


@dataclass
class TwoViewEpoch:
    batches: list  # [((view_a, view_b), labels)] as yielded
    length: int

    @cached_property
    def views(self):
        """2 x N x 3 x H x W, float32."""
        return torch.stack([torch.cat([views[v] for views, _ in self.batches]).float() for v in (0, 1)])

    @cached_property
    def labels(self):
        return torch.cat([labels for _, labels in self.batches]).tolist()


def read(batches):
    return TwoViewEpoch(list(batches), len(batches))


@pytest.fixture(scope="module")
def two_view_run(converted):
    """(kind, dtype) -> (loader, TwoViewEpoch of its epoch 0), views=2 over 'train' with seed 0."""
    cache = {}

    def run(batches):
        batches.set_epoch(0)
        return batches, read(batches)

    # `get` must not call itself: a closure that refers to itself is a reference cycle, which leaves the cache
    # to the garbage collector, and a torchvision DataLoader freed by it took 5 s per worker to shut down
    # (measured: its workers never saw the stop signal and were joined until the timeout).
    def get(kind, dtype=torch.float32):
        if (kind, torch.float32) not in cache:
            cache[kind, torch.float32] = run(loader(converted[0], kind, views=2))
        if (kind, dtype) not in cache:
            if kind == "ffcv":
                # FFCV's part does not depend on the dtype (contract.normalize casts in torch afterwards): reuse
                # the float32 loader's compiled FFCV Loader (~30 s to compile two views) under the other dtype.
                from pipelines.loaders.ffcv import FfcvLoader
                first = cache[kind, torch.float32][0]
                cache[kind, dtype] = run(FfcvLoader(first.loader, dtype=dtype, where=first.where,
                                                    augment=first.augment))
            else:
                cache[kind, dtype] = run(loader(converted[0], kind, dtype=dtype, views=2))
        return cache[kind, dtype]
    return get


def unit_rgb(images):
    """Normalized N x 3 x H x W -> 0-255 grey levels (undoes contract.normalize)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images * std + mean) * 255


def is_gray(images, levels=3.0):
    """Per image: are its R, G and B within `levels` grey levels of each other everywhere?"""
    rgb = unit_rgb(images)
    spread = rgb.amax(dim=1) - rgb.amin(dim=1)
    return spread.amax(dim=(1, 2)) < levels


# --- the contract ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_two_views_follow_the_contract(converted, two_view_run, kind, dtype):
    out, manifest = converted
    batches, epoch = two_view_run(kind, dtype)
    for views, labels in epoch.batches:
        check_views_batch(views, labels, image_size=TRAIN_SIZE, device=CPU, dtype=dtype,
                          num_classes=manifest["num_classes"])
    assert len(epoch.batches) == epoch.length == len(batches) == manifest["splits"]["train"]["samples"] // BATCH
    for view in epoch.views:  # colour jitter moves the statistics, but not out of the normalized range
        assert normalization_problem(view) is None


@pytest.mark.parametrize("kind", ["ffcv", "torchvision"])
def test_two_views_keep_the_contract_order(converted, two_view_run, kind):
    """The labels are those of the one-view order (contract.rank_indices): views=2 changes the images only."""
    stored = stored_labels(converted[0], "train")
    _, epoch = two_view_run(kind)
    order = rank_indices(len(stored), rank=0, world_size=1, train=True, seed=0, epoch=0)
    assert epoch.labels == [stored[i] for i in order[:epoch.length * BATCH]]


def test_dali_two_views_read_the_samples_one_view_reads(converted, two_view_run):
    """DALI's order comes from its reader's shuffle, seeded by the pipeline: the same as with one view."""
    _, epoch = two_view_run("dali")
    one_view = [labels for _, labels in loader(converted[0], "dali")]
    assert epoch.labels == torch.cat(one_view).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_the_two_views_differ(two_view_run, kind):
    """Every sample's views differ, and (for the real loaders) not just by a flip: each pair is compared with
    both the other view and its mirror image. A crop and jitter apart, two views of this data measure a mean
    |difference| of ~0.8 normalized, the closest pairs ~0.15; a pair differing only by a flip would be 0."""
    _, epoch = two_view_run(kind)
    a, b = epoch.views
    gap = (a - b).abs().mean(dim=(1, 2, 3))
    if kind in REAL:
        gap = torch.minimum(gap, (a - b.flip(3)).abs().mean(dim=(1, 2, 3)))
    assert gap.min() > 0.03, gap.sort().values[:5]


@pytest.mark.parametrize("kind", REAL)
def test_the_colour_ops_happen(two_view_run, kind):
    """Grayscale has p = 0.2 per view: of the epoch's 320 views ~64 are gray (1 of the 168 stored images is);
    fewer than 32 or more than 112 is > 4 standard deviations off. The views that are not gray keep colour."""
    _, epoch = two_view_run(kind)
    gray = torch.cat([is_gray(view) for view in epoch.views])
    assert 0.1 < gray.float().mean() < 0.35, f"{int(gray.sum())} of {len(gray)} views gray"


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_two_views_are_reproducible_per_seed_and_epoch(converted, two_view_run, kind):
    """A fresh loader with the same seed gives the same views for epoch 0 (a resumed run), another epoch
    other views."""
    _, first = two_view_run(kind)
    again = loader(converted[0], kind, views=2)
    assert torch.equal(read(again).views, first.views)
    again.set_epoch(1)
    assert not torch.equal(read(again).views, first.views)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("views,train,message", [(3, True, "views must be 1"), (0, True, "views must be 1"),
                                                  (2, False, "views=2 is for training")])
def test_other_view_counts_and_eval_views_are_errors(converted, kind, views, train, message):
    with pytest.raises(ValueError, match=message):
        build_loader(kind, converted[0], "train", batch_size=BATCH, image_size=TRAIN_SIZE, train=train,
                     device=CPU, views=views)


# --- the on-device colour augmentation (the ffcv loader's) --------------------------------------------------

def sample_batch(n=8, size=32, seed=0):
    """Smooth coloured float images in [0, 1], channels_last, plus fine stripes (which blur removes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    stripes = (torch.arange(size) % 2).float().view(1, 1, 1, size) * 0.2
    return (base + stripes).clamp(0, 1).expand(n, 3, size, size).contiguous(memory_format=torch.channels_last)


def colour_random(rank=0, batch=0):
    from pipelines.device_augment import batch_random
    return batch_random(CPU, 0, 0, rank, batch)


def test_device_augment_keeps_the_layout_and_range():
    from pipelines.device_augment import ColourAugment
    images = sample_batch()
    out = ColourAugment(image_size=32)(images, colour_random())
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= out.min() and out.max() <= 1


def test_colour_draws_are_each_ranks_own_and_repeat_at_a_position():
    """The colour draws come from the batch's position (seed, epoch, rank, batch), not from torch's global
    generator: the same position gives the same two views whatever that generator holds, another rank or another
    batch gives other views (nearly every image: all three operations skipped has p 0.08 per draw), and the two
    views of a batch draw apart."""
    from pipelines.device_augment import ColourAugment
    images = sample_batch(32)
    augment = ColourAugment(image_size=32)

    def views(rank, batch, global_seed=0):
        torch.manual_seed(global_seed)  # what the trainer does per step, alike on every rank
        random = colour_random(rank, batch)
        return torch.stack([augment(images, random), augment(images, random)])

    def changed(a, b):  # per view and image
        return (a - b).abs().amax(dim=(2, 3, 4)) > 1e-3
    first = views(rank=0, batch=5)
    assert torch.equal(views(rank=0, batch=5, global_seed=1), first)
    assert changed(first[0:1], first[1:2]).float().mean() > 0.75
    for other in (views(rank=1, batch=5), views(rank=0, batch=6)):
        assert changed(other, first).float().mean() > 0.75


def test_ffcv_draws_each_batchs_colours_from_its_position(two_view_run):
    """The ffcv loader hands ColourAugment the generators of each batch's (seed, epoch, rank, batch), here for
    rank 1 after a seek, one pair for both views of a batch (drawn from in turn). Its compiled FFCV Loader is the
    module's (two_view_run), under an FfcvLoader built as `build` builds it."""
    from pipelines.device_augment import batch_random
    from pipelines.loaders.ffcv import FfcvLoader, stop
    first, _ = two_view_run("ffcv")
    if first.ahead is not None:  # its next epoch, decoded ahead: one decode thread per FFCV Loader
        stop(first.ahead[1])
        first.ahead = None
    calls = []

    class Recording(torch.nn.Module):
        def forward(self, images, random):
            calls.append((random, random.device.initial_seed(), random.host.bit_generator.state))
            return first.augment(images, random)
    loader = FfcvLoader(first.loader, dtype=torch.float32, where=first.where, augment=Recording(), seed=7, rank=1)
    start = len(loader) - 2
    loader.set_epoch(2, start)
    assert len(list(loader)) == 2 and len(calls) == 4
    if loader.ahead is not None:
        stop(loader.ahead[1])
    for batch, (view_a, view_b) in zip(range(start, len(loader)), zip(calls[0::2], calls[1::2])):
        expected = batch_random(CPU, 7, 2, 1, batch)
        assert view_a[1] == expected.device.initial_seed()
        assert view_a[2] == expected.host.bit_generator.state  # fresh: the first view draws first
        assert view_b[0] is view_a[0]


@pytest.mark.parametrize("op", ["jitter", "gray", "blur"])
def test_device_augment_applies_each_op(op):
    """Each op alone with p = 1: jitter changes every image, gray makes R = G = B, blur smooths the stripes
    (by > 20 % where sigma > ~0.45, ~80 % of 32 images; sigma 0.1 leaves them as they are); with p = 0 the
    images pass through unchanged."""
    from pipelines.device_augment import ColourAugment
    images = sample_batch(32)
    off = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    assert torch.equal(ColourAugment(image_size=32, **off)(images, colour_random()), images)
    out = ColourAugment(image_size=32, **(off | {f"{op}_p": 1.0}))(images, colour_random())
    if op == "jitter":
        assert ((out - images).abs().amax(dim=(1, 2, 3)) > 0.01).all()
    elif op == "gray":
        assert ((out.amax(dim=1) - out.amin(dim=1)).amax() < 1e-5)
    else:
        def stripe_energy(x):
            return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        before, after = stripe_energy(images), stripe_energy(out)
        assert (after <= before + 1e-6).all() and (after < 0.8 * before).float().mean() > 0.5, after


def test_is_gray_tells_gray_from_colour():
    """The detector of test_the_colour_ops_happen can fail: coloured images are not gray, gray ones are."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    colour = sample_batch()
    gray = colour.mean(dim=1, keepdim=True).expand_as(colour)
    assert not is_gray((colour - mean) / std).any() and is_gray((gray - mean) / std).all()
    assert np.isclose(float(unit_rgb((gray - mean) / std).max()), float(gray.max()) * 255, atol=1e-3)
