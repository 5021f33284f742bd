"""set_epoch(epoch, start_batch) seeks (pipelines/contract.py): the batches from start_batch on are those an
uninterrupted epoch yields from there, len() stays the full epoch, a second iteration repeats from start_batch,
and the batches before start_batch are not read.

Parametrized by loader kind (SEEK_KINDS). A kind lists what its seek must reproduce (Kind): the labels always;
the pixels where the loader seeds its augmentation per sample (torchvision from (seed, epoch, index); FFCV's
crops come from numba's unseeded generators, so only its samples and their order repeat). Each kind's loader is
built and read once per module (FFCV compiles its pipeline, ~20 s) and the tests compare what it yielded.
"""
import gc
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipelines import build_loader
from pipelines.contract import rank_indices

pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
BATCH = 16
IMAGE_SIZE = 32
SEEK_TO = 4  # of the 'train' split's batches of 16 (the converted fixture: 10)
LATER = 6  # a seek within the next epoch


@dataclass(frozen=True)
class Kind:
    name: str
    library: str | None = None  # skip when it does not import
    same_pixels: bool = True  # the loader's augmentation is seeded per (seed, epoch, sample)


# dali: its default index reader draws every augmentation on the host per (seed, epoch, rank, batch)
SEEK_KINDS = [Kind("synthetic"), Kind("dali", "nvidia.dali"), Kind("ffcv", "ffcv", same_pixels=False),
              Kind("torchvision")]


def train_samples(converted) -> int:
    return converted[1]["splits"]["train"]["samples"]


def build(data, kind: Kind, **kw):
    if kind.library:
        pytest.importorskip(kind.library)
    if kind.name == "torchvision":
        gc.collect()  # see tests/test_pipelines.py `loader`: no DALI pipeline left for a forked worker
    args = dict(batch_size=BATCH, image_size=IMAGE_SIZE, train=True, device=CPU, workers=2, seed=3) | kw
    return build_loader(kind.name, data, "train", **args)


def read(loader):
    """[(images, labels)] as float32 / int64 copies (FFCV reuses its buffers; synthetic yields one batch)."""
    return [(images.float().clone(), labels.clone()) for images, labels in loader]


@dataclass
class Reads:
    length: int
    epoch1: list  # set_epoch(1), the whole epoch
    epoch2: list  # set_epoch(2) right after, the whole epoch
    seek1: list  # set_epoch(1, SEEK_TO)
    seek1_again: list  # iterated again, no set_epoch
    seek2: list  # set_epoch(2, LATER)
    length_after: int
    loader: object


@pytest.fixture(scope="module")
def reads(converted):
    cache = {}

    def get(kind: Kind) -> Reads:
        if kind.name not in cache:
            loader = build(converted[0], kind)
            length = len(loader)
            loader.set_epoch(1)
            epoch1 = read(loader)
            loader.set_epoch(2)
            epoch2 = read(loader)
            loader.set_epoch(1, SEEK_TO)
            seek1 = read(loader)
            seek1_again = read(loader)
            loader.set_epoch(2, LATER)
            seek2 = read(loader)
            cache[kind.name] = Reads(length, epoch1, epoch2, seek1, seek1_again, seek2, len(loader), loader)
        return cache[kind.name]
    return get


def assert_same_batches(got, expected, *, pixels: bool):
    assert len(got) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        assert torch.equal(labels, want_labels)
        if pixels:
            assert torch.equal(images, want_images)


@pytest.mark.parametrize("kind", SEEK_KINDS, ids=lambda k: k.name)
def test_a_seek_yields_the_uninterrupted_epoch_from_there(converted, reads, kind):
    r = reads(kind)
    assert r.length == r.length_after == len(r.epoch1) == train_samples(converted) // BATCH
    assert_same_batches(r.seek1, r.epoch1[SEEK_TO:], pixels=kind.same_pixels)
    assert_same_batches(r.seek2, r.epoch2[LATER:], pixels=kind.same_pixels)
    if kind.name != "synthetic":  # the others shuffle: a seek into another epoch must find another order
        assert not torch.equal(torch.cat([lb for _, lb in r.epoch2[LATER:]]),
                               torch.cat([lb for _, lb in r.epoch1[LATER:]]))


@pytest.mark.parametrize("kind", SEEK_KINDS, ids=lambda k: k.name)
def test_iterating_again_repeats_the_epoch_from_the_seek(reads, kind):
    r = reads(kind)
    assert_same_batches(r.seek1_again, r.seek1, pixels=kind.same_pixels)


@pytest.mark.parametrize("kind", SEEK_KINDS, ids=lambda k: k.name)
def test_start_batch_outside_the_epoch_is_an_error(converted, reads, kind):
    loader = build(converted[0], kind)  # built, not read: FFCV compiles on its first epoch only
    loader.set_epoch(0, len(loader))  # the end itself: an empty iteration
    assert list(loader) == []
    for bad in (-1, len(loader) + 1):
        with pytest.raises(ValueError, match=f"start_batch {bad} is outside the epoch's {len(loader)} batches"):
            loader.set_epoch(0, bad)


def test_torchvision_reads_no_sample_before_the_seek(converted, monkeypatch):
    """In-process (workers=0) the dataset's reads can be counted: exactly the samples of batches SEEK_TO on."""
    from pipelines.loaders import torchvision as torchvision_loader
    wanted = []
    read_sample = torchvision_loader.ShardDataset.__getitem__
    monkeypatch.setattr(torchvision_loader.ShardDataset, "__getitem__",
                        lambda self, item: (wanted.append(item), read_sample(self, item))[1])
    loader = build(converted[0], Kind("torchvision"), workers=0)
    loader.set_epoch(1, SEEK_TO)
    assert len(read(loader)) == len(loader) - SEEK_TO
    order = rank_indices(train_samples(converted), rank=0, world_size=1, train=True, seed=3, epoch=1)
    assert wanted == [(i, 1) for i in order[SEEK_TO * BATCH:len(loader) * BATCH].tolist()]


def test_ffcv_hands_its_decoder_only_the_samples_from_the_seek_on(converted, reads, monkeypatch):
    """FFCV decodes the order its Loader hands each EpochIterator: the samples of batches SEEK_TO on, cut to
    whole batches; then, once that epoch is decoded, the next epoch's from its start (decoded ahead). The
    module's FFCV loader (`reads`), whose code numba has compiled already."""
    import ffcv.loader.loader as ffcv_loader
    loader = reads(Kind("ffcv", "ffcv")).loader
    orders = []

    class Recording(ffcv_loader.EpochIterator):
        def __init__(self, loader, order):
            orders.append(np.asarray(order).tolist())
            super().__init__(loader, order)
    monkeypatch.setattr(ffcv_loader, "EpochIterator", Recording)
    loader.set_epoch(1, SEEK_TO)
    assert len(read(loader)) == len(loader) - SEEK_TO
    whole = len(loader) * BATCH
    epoch1, epoch2 = (rank_indices(train_samples(converted), rank=0, world_size=1, train=True, seed=3, epoch=e)
                      for e in (1, 2))
    assert orders == [epoch1[SEEK_TO * BATCH:whole].tolist(), epoch2[:whole].tolist()]


class FakeLoader:
    """What FFCV's QuasiRandom reads from its Loader: 8 pages of 10 samples (80), not distributed."""

    def __init__(self):
        from types import SimpleNamespace
        self.indices, self.seed, self.distributed, self.batch_size = np.arange(80, dtype="uint64"), 5, False, 8
        pages = {np.uint64(p): list(range(10 * p, 10 * p + 10)) for p in range(8)}
        self.memory_manager = SimpleNamespace(page_to_samples=pages)


def test_ffcv_quasi_random_order_seeks_and_depends_only_on_the_epoch():
    """FFCV's QuasiRandom shuffles its page table in place (an epoch's order would depend on the epochs drawn
    before it); QuasiRandomOrder starts each epoch from the table as built, and SeekableOrder slices it."""
    pytest.importorskip("ffcv")
    from pipelines.loaders.ffcv import QuasiRandomOrder, SeekableOrder
    loader = FakeLoader()
    order = SeekableOrder(QuasiRandomOrder, batch_size=8, train=True)(loader)
    fresh = order.sample_order(1)
    order.sample_order(2)
    order.start_batch = 3
    assert order.sample_order(1).tolist() == fresh[3 * 8:].tolist()
    assert sorted(fresh.tolist()) == list(range(80))


def test_torchvision_goes_on_with_its_stream_into_the_next_epoch(converted, monkeypatch):
    """set_epoch(e + 1) after epoch e continues the batch stream, which the workers prefetch across the epoch's
    end; anything else (the same epoch again, a seek) restarts it at the asked batch."""
    from pipelines.loaders import torchvision as torchvision_loader
    restarts = []
    restart = torchvision_loader.TorchvisionLoader.restart
    monkeypatch.setattr(torchvision_loader.TorchvisionLoader, "restart",
                        lambda self: (restarts.append((self.epoch, self.start_batch)), restart(self))[1])
    loader = build(converted[0], Kind("torchvision"), workers=0)
    for epoch, start_batch in [(0, 0), (1, 0), (1, 0), (2, 0), (2, SEEK_TO), (3, 0)]:
        loader.set_epoch(epoch, start_batch)
        assert len(read(loader)) == len(loader) - start_batch
    assert restarts == [(0, 0), (1, 0), (2, SEEK_TO)]
