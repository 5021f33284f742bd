"""The dali loader's RandAugment (dali_graph._rand_augment, dali_source.rand_augment_draws) and progressive
resolution (a Ramp): the host's draws follow timm's "rand-m9-mstd0.5-inc1", the graph applies to each sample the
operations the host drew for it, batches stay a function of their position, and a ramp changes the side at
epoch boundaries without a new pipeline.

The converted fixture's train split (10 batches of 16) at 32 px keeps the graph cheap on 2 cores; the loaders are
built once per module (a RandAugment graph takes ~1 s to build here) and the tests compare what they yielded."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines import build_loader  # noqa: E402
from pipelines.loaders import dali_source  # noqa: E402
from pipelines.contract import (IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_OPS, RandAugment, Ramp,  # noqa: E402
                                check_batch)
from pipelines.formats.manifest import dali_shards, load_manifest  # noqa: E402

CPU = torch.device("cpu")
SIZE, BATCH, SEED = 32, 16, 5
DEIT = RandAugment(ops=2, magnitude=9, std=0.5)  # timm's "rand-m9-mstd0.5-inc1"
OP = {name: i for i, name in enumerate(RAND_AUGMENT_OPS)}
# pointwise lookups whose result the test computes from the un-augmented pixels (timm's arguments at a bin)
LOOKUPS = {"Invert", "Posterize", "Solarize", "SolarizeAdd"}
# change any image that is not flat at the bins drawn (the others can leave one as it was: AutoContrast channels
# that span 0-255 already, Color a grey image, SolarizeAdd one without a pixel below 128, ...)
MUST_CHANGE = {"Invert", "Posterize", "Brightness", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
# identities at magnitude 0: all but the operations without a magnitude and Posterize (timm's increasing
# posterize keeps 4 bits at m 0: its strongest setting short of m 7.5)
ZERO_IS_IDENTITY = [OP[n] for n in RAND_AUGMENT_OPS if n not in {"AutoContrast", "Equalize", "Invert", "Posterize"}]


def dali(data, **kw):
    args = dict(batch_size=BATCH, image_size=SIZE, train=True, device=CPU, workers=2, seed=SEED) | kw
    return build_loader("dali", data, "train", **args)


def epoch(batches, epoch_, start=0):
    batches.set_epoch(epoch_, start)
    return [(images.clone(), labels.clone()) for images, labels in batches]


def counting(batches):
    """Counts the pipelines the loader builds."""
    builds = []
    make = batches.make_pipeline
    batches.make_pipeline = lambda at: builds.append(at) or make(at)
    return builds


def host_source(data, rand_augment=DEIT, seed=SEED):
    """The loader's external source, called here: its outputs at a position are the loader's draws there."""
    manifest = load_manifest(data)
    n = manifest["splits"]["train"]["samples"]
    plan = dali_source.Plan(samples=n, batch_size=BATCH, batches=n // BATCH, train=True, seed=seed, rank=0,
                            world_size=1)
    source = dali_source.IndexedSource(dali_shards(data, manifest, "train"), plan, views=1, rand_augment=rand_augment)
    return lambda position: dict(zip(source.outputs, source(SimpleNamespace(iteration=position)))), plan.batches


def pixels(images: torch.Tensor) -> np.ndarray:
    """The uint8 pixels behind normalized B x 3 x H x W images (crop_mirror_normalize undone), B x H x W x 3."""
    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    return np.rint(images.permute(0, 2, 3, 1).double().numpy() * std + mean).clip(0, 255).astype(np.uint8)


def lookup(name: str, image: np.ndarray, magnitude_bin: int) -> np.ndarray:
    """timm's pointwise operations (timm/data/auto_augment.py) at bin b = magnitude b / 3, written out."""
    level = magnitude_bin / 3
    if name == "Invert":
        return 255 - image
    if name == "Posterize":
        bits = max(1, 4 - int(level / 10 * 4))
        return image & np.uint8((0xFF << (8 - bits)) & 0xFF)
    if name == "Solarize":
        return np.where(image >= 256 - min(256, int(level / 10 * 256)), 255 - image, image).astype(np.uint8)
    shift = min(128, int(level / 10 * 110))  # SolarizeAdd
    return np.where(image < 128, np.minimum(255, image.astype(np.int32) + shift), image).astype(np.uint8)


@pytest.fixture(scope="module")
def runs(converted):
    """Epochs 0 and 1 on one running pipeline, with and without RandAugment (same seed, so the same crops and
    flips), and a fresh RandAugment loader sought to batch 6 of epoch 1."""
    data = converted[0]
    plain, augmented = dali(data), dali(data, rand_augment=DEIT)
    builds = counting(augmented)
    out = SimpleNamespace(plain=[epoch(plain, e) for e in (0, 1)], augmented=[epoch(augmented, e) for e in (0, 1)])
    out.builds, out.seek_at = builds, 6
    out.sought = epoch(dali(data, rand_augment=DEIT), 1, out.seek_at)
    out.other_seed = epoch(dali(data, rand_augment=DEIT, seed=SEED + 1), 1)
    return out


def test_host_draws_follow_timm(converted):
    """Two epochs of the source's draws (640 operations): every one of timm's 15 at about the uniform rate
    (chi-square, p > 0.001), about half applied, magnitudes N(9, 0.5) as bins N(27, 1.5) in [0, 30], fair
    signs; and the crops and flips are those drawn without RandAugment."""
    source, batches = host_source(converted[0])
    plain, _ = host_source(converted[0], rand_augment=None)
    draws = []
    for position in range(2 * batches):
        out = source(position)
        draws.append(out["rand_augment"])
        for name in ("crop_start", "crop_shape", "mirror", "labels"):
            assert np.array_equal(out[name], plain(position)[name]), name
    draws = np.concatenate(draws)  # samples x layers x (operation, bin, sign)
    assert draws.shape[1:] == (2, 3) and draws.dtype == np.int32
    op, bins, sign = draws[..., 0].ravel(), draws[..., 1].ravel(), draws[..., 2].ravel()
    applied = op != dali_source.NOT_APPLIED
    assert abs(applied.mean() - 0.5) < 0.06
    counts = np.bincount(op[applied], minlength=len(RAND_AUGMENT_OPS))
    assert len(counts) == len(RAND_AUGMENT_OPS) and counts.min() > 0
    expected = applied.sum() / len(RAND_AUGMENT_OPS)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 36.1, counts  # 14 degrees of freedom: p = 0.001
    assert bins.min() >= 0 and bins.max() <= 30
    assert abs(bins.mean() - 27) < 0.2 and abs(bins.std() - 1.5) < 0.2
    assert abs(sign.mean() - 0.5) < 0.06
    assert len(set(draws[:BATCH, 0, 0])) > 5  # one batch: many different operations


def test_webdataset_draws_follow_timm():
    """The webdataset reader's in-graph draws (dali_graph._random_draws) have the host's distribution."""
    from nvidia.dali import pipeline_def

    from pipelines.loaders import dali_graph

    @pipeline_def(batch_size=1000, num_threads=1, device_id=None, seed=3)
    def draws():
        return tuple(node for layer in dali_graph._random_draws(DEIT) for node in layer)
    pipe = draws()
    pipe.build()
    outs = [np.asarray(out.as_array()) for out in pipe.run()]  # layer 0's (operation, bin, sign), layer 1's
    op, bins, sign = (np.concatenate(outs[i::3]) for i in range(3))
    applied = op != dali_source.NOT_APPLIED
    assert abs(applied.mean() - 0.5) < 0.03
    counts = np.bincount(op[applied], minlength=len(RAND_AUGMENT_OPS))
    expected = applied.sum() / len(RAND_AUGMENT_OPS)
    assert len(counts) == len(RAND_AUGMENT_OPS) and ((counts - expected) ** 2 / expected).sum() < 36.1, counts
    assert bins.min() >= 0 and bins.max() <= 30 and abs(bins.mean() - 27) < 0.15 and abs(bins.std() - 1.5) < 0.15
    assert abs(sign.mean() - 0.5) < 0.03


def test_each_sample_gets_the_operations_drawn_for_it(converted, runs):
    """320 samples against the same ones without RandAugment (same crops and flips): a sample whose layers were
    both 'not applied' is unchanged, one with a single operation that changes any image (MUST_CHANGE) is changed, and
    one whose operations are all pointwise lookups is exactly timm's lookups of the un-augmented pixels (the flip,
    after RandAugment here, commutes with them)."""
    source, batches = host_source(converted[0])
    untouched = changed = looked_up = 0
    for e in (0, 1):
        for b, ((images, labels), (plain, plain_labels)) in enumerate(zip(runs.augmented[e], runs.plain[e])):
            assert torch.equal(labels, plain_labels)
            draws = source(e * batches + b)["rand_augment"]
            got, before = pixels(images), pixels(plain)
            for i, layers in enumerate(draws):
                names = [RAND_AUGMENT_OPS[op] for op, _, _ in layers if op != dali_source.NOT_APPLIED]
                if not names:
                    assert torch.equal(images[i], plain[i]), (e, b, i)
                    untouched += 1
                    continue
                if len(names) == 1 and names[0] in MUST_CHANGE:  # two can cancel (Solarize, then Invert)
                    assert not torch.equal(images[i], plain[i]), (e, b, i, names)
                    changed += 1
                if set(names) <= LOOKUPS:
                    want = before[i]
                    for op, magnitude_bin, _ in layers:
                        if op != dali_source.NOT_APPLIED:
                            want = lookup(RAND_AUGMENT_OPS[op], want, magnitude_bin)
                    assert np.array_equal(got[i], want), (e, b, i, names)
                    looked_up += 1
    assert untouched > 40 and changed > 50 and looked_up > 10, (untouched, changed, looked_up)


def test_magnitude_zero_leaves_the_magnitude_operations_as_they_were(converted, runs, monkeypatch):
    """With every layer applied and its operation drawn among those that are identities at magnitude 0 (the
    geometric ones, the enhancements, Solarize and SolarizeAdd), RandAugment(m=0, std=0) yields the batches of
    no RandAugment, to the bit; at m 9 the same draws change every sample."""
    draw = dali_source.rand_augment_draws
    seen = set()

    def restricted(rng, n, spec):
        draws = draw(rng, n, spec)
        draws[..., 0] = np.array(ZERO_IS_IDENTITY)[rng.integers(0, len(ZERO_IS_IDENTITY), draws.shape[:2])]
        seen.update(draws[..., 0].ravel().tolist())
        return draws
    monkeypatch.setattr(dali_source, "rand_augment_draws", restricted)
    zero = epoch(dali(converted[0], rand_augment=RandAugment(ops=2, magnitude=0, std=0)), 0)
    assert seen == set(ZERO_IS_IDENTITY)
    for (images, labels), (plain, plain_labels) in zip(zero, runs.plain[0]):
        assert torch.equal(labels, plain_labels) and torch.equal(images, plain)
    nine = epoch(dali(converted[0], rand_augment=RandAugment(ops=2, magnitude=9, std=0)), 0)
    for (images, _), (plain, _) in zip(nine, runs.plain[0]):
        assert not (images == plain).flatten(1).all(1).any()


def test_rand_augment_batches_depend_only_on_their_position(runs):
    """Epoch 1 after epoch 0 on one pipeline, a fresh loader sought to batch 6 of epoch 1, and (the same seed)
    the same pixels; another seed, others."""
    assert runs.builds == [0]  # epochs 0 and 1 on one running pipeline
    assert len(runs.sought) == len(runs.augmented[1]) - runs.seek_at
    for (a, la), (b, lb) in zip(runs.augmented[1][runs.seek_at:], runs.sought):
        assert torch.equal(la, lb) and torch.equal(a, b)
    assert not torch.equal(runs.other_seed[0][0], runs.augmented[1][0][0])


RAMP = Ramp(start_size=32, end_size=64, start_epoch=0, end_epoch=2, step=16)


@pytest.mark.parametrize("reader,rand_augment", [("index", None), ("index", DEIT), ("webdataset", None),
                                                 ("webdataset", DEIT)])
def test_a_ramp_sets_each_epochs_side(converted, reader, rand_augment):
    """Epochs 0, 1, 2 at 32, 48, 64 px under the contract. The index reader changes side on its running
    pipeline (one build for the three epochs), and a loader sought to epoch 1 yields its first batch; the
    webdataset reader builds each epoch's pipeline at the epoch's side."""
    batches = dali(converted[0], image_size=224, ramp=RAMP, rand_augment=rand_augment, options={"reader": reader})
    builds = counting(batches)
    epochs = [epoch(batches, e) for e in range(3)]
    for e, want in enumerate((32, 48, 64)):
        assert len(epochs[e]) == len(batches)
        for images, labels in epochs[e]:
            check_batch(images, labels, image_size=want, device=CPU, dtype=torch.float32,
                        num_classes=converted[1]["num_classes"])
    if reader == "index":
        assert builds == [0]
        sought = epoch(dali(converted[0], image_size=224, ramp=RAMP, rand_augment=rand_augment), 1, 0)
        assert torch.equal(sought[0][0], epochs[1][0][0])
    else:
        assert builds == [0, 1, 2]


def test_a_ramp_is_for_one_view(converted):
    with pytest.raises(ValueError, match="views=1"):
        dali(converted[0], views=2, ramp=RAMP)
