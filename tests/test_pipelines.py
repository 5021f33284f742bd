"""The loader contract (pipelines/contract.py), on the CPU, for every loader kind: dali (DALI's CPU operators),
ffcv, torchvision (the reference) and synthetic.

FFCV compiles each new Loader's pipeline with numba on its first epoch (~8 s, ~15 s for the first one in a
process), so every loader whose output several tests check is built and read once per module
(`eval_epoch`, `train_run`, `train_orders`) and the tests compare what it yielded.
"""
import gc
import hashlib
import io
import itertools
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pytest
import torch

from pipelines import build_loader
from pipelines.contract import (IMAGENET_MEAN, IMAGENET_STD, LoaderUnavailable, check_batch, normalize, rank_indices,
                                rank_samples)
from pipelines.formats.manifest import DatasetError
from pipelines.loaders.torchvision import transforms
from test_convert import shard_samples

# numba's Dispatcher finalizer raises KeyError when FFCV's compiled pipelines are garbage-collected
# (numba 0.68 with FFCV 1.0.2); harmless, and noisy: dozens of traceback lines per warning.
pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
KINDS = ["dali", "ffcv", "torchvision", "synthetic"]
REAL = ["dali", "ffcv", "torchvision"]  # the kinds that read the stored images
LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv"}
BATCH = 16
TRAIN_SIZE = 64
# Eval images are compared across loaders (test_eval_agrees_with_the_torchvision_reference); at 64 px the
# sample images' stripes and checkers sit near the Nyquist limit and the resamplers' aliasing differs most.
EVAL_SIZE = 96
WORKERS = 2


def needs(kind):
    if kind in LIBRARY:
        pytest.importorskip(LIBRARY[kind])


def loader(data, kind, split="train", train=True, **kw):
    needs(kind)
    args = dict(batch_size=BATCH, image_size=TRAIN_SIZE if train else EVAL_SIZE, train=train, device=CPU,
                workers=WORKERS) | kw
    if kind == "torchvision" and args["workers"]:
        # Its DataLoader forks worker processes. A DALI pipeline of an earlier test that is still waiting
        # in a garbage cycle (a DatasetError's traceback holds one) would be freed in the child, where its
        # threads do not exist, and hang the child in the pipeline's destructor: collect it here first.
        gc.collect()
    return build_loader(kind, data, split, **args)


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_at_the_end():
    """Torn down after the module's caches: frees their DALI pipelines here, so that a later module whose
    torchvision DataLoader forks workers does not hand them to the children (see `loader`)."""
    yield
    gc.collect()


def stored_labels(out, split):
    return [label for _, label, _ in shard_samples(out, split)]


def fingerprint(image):
    """Identifies an eval image: eval output is deterministic per loader (no random crop, no flip)."""
    return hashlib.sha1(image.float().numpy().tobytes()).hexdigest()


@dataclass
class Epoch:
    batches: list  # [(images, labels)] as yielded
    length: int  # len() of the loader that yielded them

    @cached_property
    def images(self):
        return torch.cat([images for images, _ in self.batches]).float()

    @cached_property
    def labels(self):
        # Concatenated after the epoch: a loader that hands out buffers it reuses later (FFCV does,
        # batches_ahead + 2 batches on) shows up here as labels that no longer match the stored ones.
        return torch.cat([labels for _, labels in self.batches]).tolist()

    @cached_property
    def fingerprints(self):
        return Counter(fingerprint(image) for image in self.images)


def read(batches):
    return Epoch(list(batches), len(batches))


@pytest.fixture(scope="module")
def eval_epoch(converted):
    """(kind, split, rank=0, world_size=1) -> the Epoch of that eval loader, built and read once per module.
    Only the output is kept: torchvision's persistent workers end with their loader."""
    cache = {}

    def get(kind, split, rank=0, world_size=1):
        key = kind, split, rank, world_size
        if key not in cache:
            cache[key] = read(loader(converted[0], kind, split, train=False, rank=rank, world_size=world_size))
        return cache[key]
    return get


@pytest.fixture(scope="module")
def train_run(converted):
    """(kind, dtype) -> (loader, Epoch of its epoch 0) of a train loader over 'train' with seed 0."""
    cache = {}

    def get(kind, dtype=torch.float32):
        if (kind, dtype) not in cache:
            batches = loader(converted[0], kind, dtype=dtype)
            batches.set_epoch(0)
            cache[kind, dtype] = batches, read(batches)
        return cache[kind, dtype]
    return get


@pytest.fixture(scope="module")
def train_orders(train_run, converted):
    """kind -> the train label orders the reshuffling tests compare, read once per kind:
    seed 0: epochs 0, 1, 2 in a row, then 0 again (a jump back);
    seed 1: epoch 1 on a fresh loader (a resumed run), then 0, then 1 again in a row."""
    cache = {}

    def labels(batches, epoch):
        batches.set_epoch(epoch)
        return read(batches).labels

    def get(kind):
        if kind not in cache:
            batches, first = train_run(kind)
            orders = {"e0": first.labels, "length": first.length}
            for epoch in (1, 2):
                orders[f"e{epoch}"] = labels(batches, epoch)
            orders["e0 again"] = labels(batches, 0)
            other = loader(converted[0], kind, seed=1)
            orders["seed 1 e1 fresh"] = labels(other, 1)
            orders["seed 1 e0"] = labels(other, 0)
            orders["seed 1 e1 in a row"] = labels(other, 1)
            cache[kind] = orders
        return cache[kind]
    return get


# --- 1. the contract, train mode --------------------------------------------------------------------------

def normalization_problem(images):
    """Why a train epoch does not look normalized, or None. The sample images are not ImageNet-coloured,
    so the bounds are loose on purpose (normalized, this data measures channel means 0.2-0.45 and stds
    0.8-0.9), yet each usual mistake breaks them: unnormalized uint8 (mean ~130, std ~50), a /255-only
    scaling (std ~0.2), a missing mean subtraction (means ~2.3) or a missing division by the std (std ~0.2)."""
    mean, std = images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))
    if mean.abs().max() >= 0.75 or std.min() <= 0.6 or std.max() >= 1.4:
        return f"channel means {mean.tolist()}, stds {std.tolist()}"
    return None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_train_batches_follow_the_contract(converted, train_run, kind, dtype):
    out, manifest = converted
    batches, epoch = train_run(kind, dtype)
    for images, labels in epoch.batches:
        check_batch(images, labels, image_size=TRAIN_SIZE, device=CPU, dtype=dtype,
                    num_classes=manifest["num_classes"])
    assert len(epoch.batches) == epoch.length == len(batches) == manifest["splits"]["train"]["samples"] // BATCH
    assert normalization_problem(epoch.images) is None  # synthetic's randn passes too: it is the bound


def test_normalization_bounds_catch_the_usual_mistakes(train_run):
    """The statistics check above can fail: undo the reference's normalization in the usual wrong ways."""
    images = train_run("torchvision")[1].images
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    unit = images * std + mean  # what ToTensor gives: [0, 1]
    assert normalization_problem(images) is None
    for wrong in (unit * 255, unit, unit / std, unit - mean):  # uint8, /255 only, no mean, no std
        assert normalization_problem(wrong) is not None


# --- 2. eval covers every sample once, in stored order ------------------------------------------------------

@pytest.mark.parametrize("kind", REAL)
@pytest.mark.parametrize("split", ["train", "holdout", "val"])
def test_eval_reads_every_sample_once_in_stored_order(converted, eval_epoch, kind, split):
    """All three read eval in stored order with one rank. The 'train' split has 11 batches, more than the
    batches_ahead + 2 = 5 buffers FFCV cycles through: had the ffcv loader not copied the labels out of
    them, the labels collected over the epoch would not match the stored ones (tested: 72 of 168 differ)."""
    out, manifest = converted
    epoch = eval_epoch(kind, split)
    for images, labels in epoch.batches:
        check_batch(images, labels, image_size=EVAL_SIZE, device=CPU, dtype=torch.float32,
                    num_classes=manifest["num_classes"])
    assert epoch.labels == stored_labels(out, split)
    assert len(epoch.labels) == manifest["splits"][split]["samples"]
    assert len(epoch.batches) == epoch.length == -(-len(epoch.labels) // BATCH)


# --- 3. ranks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", REAL)
@pytest.mark.parametrize("split,world_size", [("val", 2), ("holdout", 3)])
def test_eval_across_ranks_reads_each_sample_once(converted, eval_epoch, kind, split, world_size):
    """The ranks' images together are the one-rank images, none twice (DALI gives a rank a contiguous
    part, the others every world_size-th sample: the union is what counts). 20 samples over 3 ranks
    leaves them uneven."""
    n = converted[1]["splits"][split]["samples"]
    parts = [rank_indices(n, rank=r, world_size=world_size, train=False, seed=0, epoch=0) for r in range(world_size)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    whole = eval_epoch(kind, split)
    ranks = [eval_epoch(kind, split, rank, world_size) for rank in range(world_size)]
    for epoch in ranks:
        assert len(epoch.batches) == epoch.length
    assert sum((epoch.fingerprints for epoch in ranks), Counter()) == whole.fingerprints
    assert sum(whole.fingerprints.values()) == n
    assert Counter(sum((epoch.labels for epoch in ranks), [])) == Counter(whole.labels)


def test_a_ranks_share_is_counted_without_its_permutation():
    """The loaders size an epoch with rank_samples, which must count what rank_indices gives."""
    for n, world_size, train in itertools.product(range(12), (1, 2, 3, 5), (True, False)):
        for rank in range(world_size):
            assert rank_samples(n, rank=rank, world_size=world_size, train=train) == len(
                rank_indices(n, rank=rank, world_size=world_size, train=train, seed=0, epoch=0))


@pytest.mark.parametrize("kind", KINDS)
def test_train_ranks_step_in_lockstep(converted, kind):
    """DDP steps every rank together: the same len() on both ranks, the last partial batch dropped."""
    n = converted[1]["splits"]["train"]["samples"]
    ranks = [loader(converted[0], kind, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(batches) for batches in ranks] == [(n // 2) // BATCH] * 2
    if kind != "ffcv":  # FFCV would compile two more pipelines (~8 s each); it cuts its epoch to len() batches
        assert [sum(1 for _ in batches) for batches in ranks] == [(n // 2) // BATCH] * 2
    a, b = (set(rank_indices(n, rank=r, world_size=2, train=True, seed=0, epoch=3).tolist()) for r in (0, 1))
    assert not a & b and len(a) == len(b) == n // 2


def test_dali_train_ranks_with_uneven_shards_step_in_lockstep(converted):
    """Only DALI's webdataset reader splits a split by its own shards (sizes 6, 7, 7 here) instead of
    rank_indices: the ranks with a longer shard must not take an extra step, in this epoch or the next ones."""
    n = converted[1]["splits"]["holdout"]["samples"]
    for rank in range(3):
        batches = loader(converted[0], "dali", "holdout", rank=rank, world_size=3, batch_size=2,
                         options={"reader": "webdataset"})
        assert len(batches) == (n // 3) // 2
        for epoch in range(3):
            batches.set_epoch(epoch)
            assert sum(1 for _ in batches) == len(batches), (rank, epoch)


# --- 4. reshuffling ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", REAL)
def test_train_order_is_reshuffled_per_epoch_and_reproducible(train_orders, kind):
    orders = train_orders(kind)
    assert len(orders["e0"]) == orders["length"] * BATCH
    assert orders["e0 again"] == orders["e0"]  # set_epoch(0) twice: the same order
    assert orders["e1"] != orders["e0"]  # another epoch: another order
    assert orders["seed 1 e0"] != orders["e0"]  # another seed: another order


@pytest.mark.parametrize("kind", REAL)
def test_a_resumed_run_reads_the_epoch_an_uninterrupted_one_reads(train_orders, kind):
    orders = train_orders(kind)
    assert orders["seed 1 e1 fresh"] == orders["seed 1 e1 in a row"]


@pytest.mark.parametrize("kind", REAL)
def test_a_train_epoch_reads_each_sample_at_most_once(converted, train_orders, kind):
    out, manifest = converted
    stored = stored_labels(out, "train")
    orders = train_orders(kind)
    for name in ("e0", "e1", "e2"):
        assert len(orders[name]) == orders["length"] * BATCH
        assert not Counter(orders[name]) - Counter(stored), name  # no class read more often than stored
    if kind != "dali":  # the contract's order (rank_indices); DALI shuffles its shards in a buffer instead
        for epoch in (0, 1, 2):
            order = rank_indices(len(stored), rank=0, world_size=1, train=True, seed=0, epoch=epoch)
            assert orders[f"e{epoch}"] == [stored[i] for i in order[:orders["length"] * BATCH]]


# --- 5. the loaders agree on eval images ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dali", "ffcv"])
@pytest.mark.parametrize("split", ["train", "holdout", "val"])
def test_eval_agrees_with_the_torchvision_reference(eval_epoch, kind, split):
    """Same samples in the same order as torchvision, and nearly the same pixels. 0.1 normalized is about
    6 grey levels (0.1 x 0.225 x 255): the decoders (libjpeg-turbo in PIL and FFCV, nvImageCodec's CPU
    decoder in DALI: IDCT and chroma upsampling) and the resamplers (PIL's bilinear with antialias, DALI's
    linear with antialias, OpenCV's INTER_AREA on FFCV's center crop) differ by a few levels. Measured on
    this data at 96 px: per-image channel means within 0.048 (0.032 on holdout and val), per-image mean
    |difference| within 0.167 (0.091 on holdout and val; the worst are 500-px images whose fine stripes
    each resampler aliases in its own way; at 64 px DALI reaches 0.23, hence EVAL_SIZE), 0.035 on average.
    A mirrored, shifted or differently cropped image is much further off: mirrored, per-image |difference|
    up to 0.86-1.29 (0.43 on average), shifted by 1/8 of the width 0.54-0.75 (0.29), a crop 0.875x too
    wide 0.25-0.41 (0.14) with channel means off by up to 0.25; the first two are checked below."""
    reference = eval_epoch("torchvision", split)
    epoch = eval_epoch(kind, split)
    assert epoch.labels == reference.labels
    ref, images = reference.images, epoch.images
    mean_gap = (images.mean(dim=(2, 3)) - ref.mean(dim=(2, 3))).abs().amax(dim=1)
    pixel_gap = (images - ref).abs().mean(dim=(1, 2, 3))
    assert mean_gap.max() < 0.1, mean_gap
    assert pixel_gap.max() < 0.2, pixel_gap
    assert pixel_gap.mean() < 0.1, pixel_gap
    # The pixel bounds can fail: the reference against its mirror image, or shifted by 1/8 of its width.
    for wrong in (ref.flip(3), ref.roll(EVAL_SIZE // 8, 3)):
        gap = (wrong - ref).abs().mean(dim=(1, 2, 3))
        assert gap.max() > 0.2 and gap.mean() > 0.1


def test_eval_image_is_the_stored_jpeg_resized_and_center_cropped(converted, eval_epoch):
    from PIL import Image
    out, _ = converted
    images, _ = eval_epoch("torchvision", "val").batches[0]
    jpeg = shard_samples(out, "val")[0][2]
    expected = transforms(EVAL_SIZE, train=False)(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert expected.shape == (3, EVAL_SIZE, EVAL_SIZE) and expected.dtype == torch.uint8
    assert torch.allclose(images[0], normalize(expected[None], torch.float32)[0], atol=1e-5)


@pytest.mark.parametrize("kind,workers", [("dali", 1), ("ffcv", 1), ("torchvision", 0)])
def test_worker_count_does_not_change_the_batches(converted, eval_epoch, kind, workers):
    """Against the cached eval epoch read with WORKERS; torchvision's 0 is the main-process path."""
    other = read(loader(converted[0], kind, "holdout", train=False, workers=workers))
    reference = eval_epoch(kind, "holdout")
    assert [labels.tolist() for _, labels in other.batches] == [labels.tolist() for _, labels in reference.batches]
    assert other.fingerprints == reference.fingerprints


# --- 6. bad requests and bad data ------------------------------------------------------------------------

def test_unknown_kind_lists_the_kinds(converted):
    with pytest.raises(ValueError, match="unknown loader 'tfrecord'; choose from dali, ffcv, torchvision, synthetic"):
        build_loader("tfrecord", converted[0], "train", batch_size=BATCH, image_size=32, train=True, device=CPU)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_split_or_dataset_is_a_clear_error(converted, tmp_path, kind):
    with pytest.raises(DatasetError, match=r"no split 'test' \(it has \['holdout', 'train', 'val'\]\)"):
        loader(converted[0], kind, "test")
    with pytest.raises(DatasetError, match="no such directory"):
        loader(tmp_path / "nowhere", kind)
    with pytest.raises(DatasetError, match="not a converted dataset"):
        loader(tmp_path, kind)


@pytest.fixture(scope="module")
def one_format(clean_tree, tmp_path_factory):
    """format -> a dataset converted with only that format."""
    from conftest import quiet
    from pipelines.convert.job import ConvertSettings, convert
    cache = {}

    def get(fmt):
        if fmt not in cache:
            cache[fmt] = tmp_path_factory.mktemp(f"only_{fmt}") / "out"
            convert(clean_tree[0], cache[fmt], ConvertSettings(formats=(fmt,)), workers=1, console=quiet())
        return cache[fmt]
    return get


@pytest.mark.parametrize("fmt,kind,works", [("ffcv", "dali", False), ("ffcv", "torchvision", False),
                                            ("ffcv", "ffcv", True), ("dali", "ffcv", False),
                                            ("dali", "dali", True), ("dali", "torchvision", True)])
def test_a_format_that_was_not_converted_names_the_flag(one_format, fmt, kind, works):
    if works:  # the dataset is fine for the kinds whose format it holds (built only: FFCV would compile)
        assert len(loader(one_format(fmt), kind, batch_size=4)) > 0
    else:
        with pytest.raises(DatasetError, match="--formats ffcv,dali"):
            loader(one_format(fmt), kind, batch_size=4)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def zero_first_jpeg_header(out):
    """Zeroes the first 4 bytes (the JPEG's SOI marker) of the val shard's first sample, found in the
    index: its second line reads 'jpg OFFSET SIZE 00000000.jpg cls ...'."""
    index = out / "dali/val/shard-000000.idx"
    fields = index.read_text().splitlines()[1].split()
    offset = int(fields[fields.index("jpg") + 1])
    overwrite(out / "dali/val/shard-000000.tar", offset, b"\0" * 4)


def idx_overwritten(out):
    index = out / "dali/val/shard-000000.idx"
    index.write_bytes(b"x" * index.stat().st_size)


def truncated_shard(out):
    truncate(out / "dali/train/shard-000001.tar")


DAMAGE = [  # kind, split, damage, what the message must say
    pytest.param("dali", "train", truncated_shard,
                 [r"shard-000001\.tar: [\d,]+ bytes, the manifest says [\d,]+ \(truncated"], id="dali-truncated-tar"),
    pytest.param("torchvision", "train", truncated_shard,
                 [r"shard-000001\.tar.*truncated"], id="torchvision-truncated-tar"),
    pytest.param("ffcv", "train", lambda out: truncate(out / "ffcv/train.beton"), [r"train\.beton: .*\(truncated"],
                 id="ffcv-truncated-beton"),
    pytest.param("dali", "val", idx_overwritten, [r"shard-000000\.idx: line 1", "verify_dataset"],
                 id="dali-overwritten-idx"),
    pytest.param("torchvision", "val", idx_overwritten,
                 [r"shard-000000\.idx", "verify_dataset"], id="torchvision-overwritten-idx"),
    pytest.param("dali", "val", zero_first_jpeg_header, ["decoders", "split 'val'", "verify_dataset"],
                 id="dali-broken-jpeg"),
    pytest.param("torchvision", "val", zero_first_jpeg_header,
                 ["split 'val'", "verify_dataset"], id="torchvision-broken-jpeg"),
    pytest.param("ffcv", "val", lambda out: overwrite(out / "ffcv/val.beton", 0, b"\0" * 64),
                 [r"FFCV could not open .*val\.beton", "verify_dataset"], id="ffcv-zeroed-beton-header"),
]


@pytest.mark.parametrize("kind,split,damage,messages", DAMAGE)
def test_damaged_data_is_a_dataset_error_naming_it(damaged, kind, split, damage, messages):
    damage(damaged)
    # torchvision reads in the main process here: a DataLoader whose worker raised takes ~10 s to shut its
    # workers down (it waits 2 x 5 s for them), and the error is the same.
    workers = 0 if kind == "torchvision" else WORKERS
    with pytest.raises(DatasetError) as error:
        for _ in loader(damaged, kind, split, train=split == "train", workers=workers):
            pass
    for message in messages:
        assert error.match(message)


@pytest.mark.parametrize("kind,module", LIBRARY.items())
def test_a_missing_library_names_the_extra_to_install(converted, monkeypatch, kind, module):
    needs(kind)
    args = dict(batch_size=BATCH, image_size=32, train=False, device=CPU, workers=1)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
        with pytest.raises(LoaderUnavailable, match=rf"pip install -e '\.\[{kind}\]'"):
            build_loader(kind, converted[0], "val", **args)
    assert len(build_loader(kind, converted[0], "val", **args)) == 2  # and importable again


@pytest.mark.parametrize("kind,options,message", [
    ("dali", {"threads": 4}, "unknown option 'threads' for the 'dali' loader; known: reader, prefetch_queue_depth, "
                             "shuffle_buffer, hw_decoder_load, preallocate_side"),
    ("dali", {"reader": "tar"}, "option 'reader' of the 'dali' loader must be one of index, webdataset, got 'tar'"),
    ("ffcv", {"threads": 4}, "unknown option 'threads' for the 'ffcv' loader; known: batches_ahead, os_cache, order"),
    ("torchvision", {"prefetch_factor": 4}, "unknown option 'prefetch_factor' for the 'torchvision' loader"),
    ("synthetic", {"prefetch_queue_depth": 2}, "unknown option 'prefetch_queue_depth' for the 'synthetic' loader"),
    ("dali", {"prefetch_queue_depth": "2"}, "option 'prefetch_queue_depth' of the 'dali' loader must be int, got '2'"),
    ("dali", {"prefetch_queue_depth": True}, "option 'prefetch_queue_depth' of the 'dali' loader must be int"),
    ("dali", {"read_ahead": 1}, "option 'read_ahead' of the 'dali' loader must be bool, got 1"),
    ("ffcv", {"os_cache": "yes"}, "option 'os_cache' of the 'ffcv' loader must be bool"),
    ("ffcv", {"order": "sequential"}, "option 'order' of the 'ffcv' loader must be 'random' or 'quasi_random'"),
])
def test_bad_options_are_clear_errors(converted, kind, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        loader(converted[0], kind, options=options)


def test_ffcv_quasi_random_order_over_ranks_needs_torch_distributed(converted):
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        loader(converted[0], "ffcv", options={"order": "quasi_random"}, rank=1, world_size=2)


@pytest.mark.parametrize("kind,options", [("dali", {"hw_decoder_load": 1, "prefetch_queue_depth": 1}),
                                          ("dali", {"reader": "webdataset", "prefetch_queue_depth": 1}),
                                          ("ffcv", {"batches_ahead": 2, "os_cache": False})])
def test_good_options_are_accepted(converted, kind, options):
    """An int for a float option is fine. FFCV is only built (its first epoch would compile)."""
    batches = loader(converted[0], kind, "val", train=False, options=options)
    assert len(batches) == 2
    if kind == "dali":
        assert sum(len(labels) for _, labels in batches) == converted[1]["splits"]["val"]["samples"]
