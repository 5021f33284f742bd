"""Progressive resolution (contract.Ramp) and device RandAugment in the ffcv and torchvision loaders.

Ramp 32 -> 64 px over epochs 0-2 in steps of 16: epochs 0, 1, 2 train at 32, 48, 64 px, a seek finds its epoch's
size, and the epoch start costs nothing extra: FFCV's next-epoch decode thread is started ahead, at the next size,
in the Loader that numba compiled once (no new Loader, no compilation); torchvision's persistent workers follow
the ramp inside the one batch stream (no restart). Each kind's ramp loader is built and read once per module
(FFCV compiles its pipeline on its first epoch, ~15 s) and the tests compare what it yielded.

RandAugment (pipelines/rand_augment.py) runs on the uint8 batch on the device, drawn per (seed, epoch, rank, batch):
torchvision's pixels repeat per seed, so equal seeds give equal batches; FFCV's crops are unseeded, so its test
records what rand_augment got and gave.
"""
import gc
from dataclasses import dataclass

import pytest
import torch

from pipelines import build_loader
from pipelines.contract import RandAugment, Ramp, check_batch, normalize

pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
BATCH = 16
IMAGE_SIZE = 64  # what a loader without the ramp would read
RAMP = Ramp(start_size=32, end_size=64, start_epoch=0, end_epoch=2, step=16)
SIZES = {0: 32, 1: 48, 2: 64}
SEEK_TO = 4  # of the 'train' split's 10 batches of 16 (the converted fixture)
SEEKS = [(1, SEEK_TO), (0, SEEK_TO)]  # after epoch 2: back to smaller sizes
LIBRARY = {"ffcv": "ffcv"}


def build(data, kind, **kw):
    if kind in LIBRARY:
        pytest.importorskip(LIBRARY[kind])
    if kind == "torchvision":
        gc.collect()  # see tests/test_pipelines.py `loader`: no DALI pipeline left for a forked worker
    args = dict(batch_size=BATCH, image_size=IMAGE_SIZE, train=True, device=CPU, workers=2, seed=3) | kw
    return build_loader(kind, data, "train", **args)


def needs_rand_augment():
    pytest.importorskip("pipelines.rand_augment", reason="pipelines/rand_augment.py has not landed yet")


@dataclass
class RampRun:
    reads: dict  # (epoch, start_batch) -> [(images, labels)] copied as yielded
    events: list  # in order: ("start", epoch, start_batch, side) or ("restart", epoch, start_batch); ("batch", e, b)
    batches: int  # len()
    compiles: int = 0  # numba compilations while epochs 1 and 2 were read (ffcv)
    same_ffcv_loader: bool = False  # the FFCV Loader after epoch 2 is the one that read epoch 0 (ffcv)
    recompile: bool = True  # that Loader's flag: recompile every epoch (ffcv)
    loader: object = None  # the FfcvLoader, its decode thread stopped (ffcv; torchvision's workers end with it)


def record_starts(loader, kind, events):
    """Records on the instance each start of a decode thread (ffcv) or of the batch stream (torchvision)."""
    if kind == "ffcv":
        start = loader.start

        def recorded(epoch, start_batch):
            iterator = start(epoch, start_batch)
            events.append(("start", epoch, start_batch, loader.crops[0].output_size[0]))
            return iterator
        loader.start = recorded
    else:
        restart = loader.restart
        loader.restart = lambda: (events.append(("restart", loader.epoch, loader.start_batch)), restart())[1]


def read_into(loader, epoch, start_batch, run):
    loader.set_epoch(epoch, start_batch)
    batches = []
    for b, (images, labels) in enumerate(loader, start=start_batch):
        run.events.append(("batch", epoch, b))
        batches.append((images.clone(), labels.clone()))  # FFCV reuses its buffers
    run.reads[epoch, start_batch] = batches


class CompileCount:
    """Counts numba compilations (numba's event API); FFCV compiles in its decode thread, events are global."""

    def __init__(self):
        from numba.core import event
        self.count = 0

        class Listener(event.Listener):
            def on_start(listener, ev):
                self.count += 1

            def on_end(listener, ev):
                pass
        self.listener = Listener()

    def __enter__(self):
        from numba.core import event
        event.register("numba:compile", self.listener)
        return self

    def __exit__(self, *exc):
        from numba.core import event
        event.unregister("numba:compile", self.listener)


@pytest.fixture(scope="module")
def ramp_run(converted):
    """kind -> RampRun of its ramp loader: epochs 0, 1, 2 in a row, then the SEEKS."""
    cache = {}

    def get(kind):
        if kind not in cache:
            loader = build(converted[0], kind, ramp=RAMP)
            run = RampRun({}, [], len(loader))
            record_starts(loader, kind, run.events)
            read_into(loader, 0, 0, run)  # FFCV compiles here
            if kind == "ffcv":
                first = loader.loader
                with CompileCount() as compiles:
                    for epoch in (1, 2):
                        read_into(loader, epoch, 0, run)
                run.compiles, run.same_ffcv_loader = compiles.count, loader.loader is first
                run.recompile = first.recompile
            else:
                for epoch in (1, 2):
                    read_into(loader, epoch, 0, run)
            for epoch, start_batch in SEEKS:
                read_into(loader, epoch, start_batch, run)
            # The recorders refer to the loader: a cycle, which would leave torchvision's workers to the garbage
            # collector (~5 s each to shut down then, see tests/test_two_views.py) instead of `del` below.
            vars(loader).pop("start" if kind == "ffcv" else "restart")
            if kind == "ffcv":
                if loader.ahead is not None:  # the next epoch, decoded ahead: stop its thread
                    from pipelines.loaders.ffcv import stop
                    stop(loader.ahead[1])
                    loader.ahead = None
                run.loader = loader
            del loader
            cache[kind] = run
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", ["ffcv", "torchvision"])
def test_train_batches_follow_the_ramp_and_the_contract(converted, ramp_run, kind):
    run = ramp_run(kind)
    for epoch in (0, 1, 2):
        batches = run.reads[epoch, 0]
        assert len(batches) == run.batches == converted[1]["splits"]["train"]["samples"] // BATCH
        for images, labels in batches:
            check_batch(images, labels, image_size=SIZES[epoch], device=CPU, dtype=torch.float32,
                        num_classes=converted[1]["num_classes"])


@pytest.mark.parametrize("kind", ["ffcv", "torchvision"])
def test_a_seek_yields_its_epochs_size(converted, ramp_run, kind):
    run = ramp_run(kind)
    for epoch, start_batch in SEEKS:
        batches = run.reads[epoch, start_batch]
        assert len(batches) == run.batches - start_batch
        for (images, labels), (_, uninterrupted) in zip(batches, run.reads[epoch, 0][start_batch:]):
            check_batch(images, labels, image_size=SIZES[epoch], device=CPU, dtype=torch.float32,
                        num_classes=converted[1]["num_classes"])
            assert torch.equal(labels, uninterrupted)  # the same samples, found by seeking


def test_ffcv_starts_the_next_epoch_ahead_at_its_size_without_a_new_loader_or_compilation(ramp_run):
    """The next epoch's decode thread starts while this epoch's last batches are still being taken, with its
    buffers at the next epoch's size, in the same FFCV Loader, and numba compiles nothing for the new sizes."""
    run = ramp_run("ffcv")
    last = run.batches - 1
    for epoch in (1, 2):
        started = run.events.index(("start", epoch, 0, SIZES[epoch]))
        first_batch = run.events.index(("batch", epoch, 0))
        assert started < run.events.index(("batch", epoch - 1, last)), run.events
        between = run.events[run.events.index(("batch", epoch - 1, last)):first_batch]
        assert not [e for e in between if e[0] == "start"], between  # nothing started at the epoch start
    assert run.compiles == 0
    assert run.same_ffcv_loader and not run.recompile


def test_torchvision_workers_follow_the_ramp_in_one_stream(ramp_run):
    """Epochs 0, 1, 2 in a row come from one batch stream (its workers cropped each epoch at its size); only
    the seeks restart it."""
    run = ramp_run("torchvision")
    assert [e for e in run.events if e[0] == "restart"] == [("restart", 0, 0)] + [("restart", *s) for s in SEEKS]


def test_eval_loaders_take_no_ramp_or_rand_augment(converted):
    for extra in (dict(ramp=RAMP), dict(rand_augment=RandAugment())):
        with pytest.raises(ValueError, match="for train loaders"):
            build_loader("torchvision", converted[0], "val", batch_size=BATCH, image_size=32, train=False,
                         device=CPU, workers=0, **extra)


# --- RandAugment ------------------------------------------------------------------------------------------------

def first_batches(loader, epoch=0, start_batch=0, count=3):
    loader.set_epoch(epoch, start_batch)
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if len(out) == count:
            break
    return out


def test_torchvision_rand_augment_is_seeded_and_changes_the_pixels(converted):
    """In-process (workers=0): a second loader with the same seed, seeked to batch 1, yields the first one's
    batch 1 (RandAugment drawn per (seed, epoch, rank, batch)), and the RandAugment batches differ from the plain
    ones (the same crops: both seeded alike) on most images."""
    needs_rand_augment()
    contract = dict(image_size=32, device=CPU, dtype=torch.float32, num_classes=converted[1]["num_classes"])
    args = dict(image_size=32, workers=0, seed=5)
    # 3 batches in all: rand_augment takes ~1 s per batch of 16 at 32 px on 2 busy cores
    one = first_batches(build(converted[0], "torchvision", rand_augment=RandAugment(), **args), count=2)
    seek = first_batches(build(converted[0], "torchvision", rand_augment=RandAugment(), **args), start_batch=1,
                         count=1)
    plain = first_batches(build(converted[0], "torchvision", **args), count=1)
    for images, labels in one:
        check_batch(images, labels, **contract)
    assert torch.equal(seek[0][0], one[1][0]) and torch.equal(seek[0][1], one[1][1])
    (images, labels), (unaugmented, plain_labels) = one[0], plain[0]
    assert torch.equal(labels, plain_labels)
    changed = (images != unaugmented).flatten(1).any(1).float().mean()
    assert changed >= 0.5, f"RandAugment changed {changed:.0%} of the images"  # expected: 75 % (2 ops at p 0.5)


def test_ffcv_rand_augment_runs_per_batch_on_the_uint8_batch(converted, ramp_run, monkeypatch):
    """FFCV's crops are unseeded, so the test records rand_augment's calls: it gets each uint8 batch, is seeded
    from (seed, epoch, rank, batch) of that batch (here after a seek), changes the pixels, and the loader yields
    its output normalized, under the contract. The loader is the ramp run's FFCV Loader, compiled already (a new
    one compiles for ~15 s), under an FfcvLoader built as `build` builds it with rand_augment (checked)."""
    needs_rand_augment()
    from pipelines import rand_augment as module
    from pipelines.loaders.ffcv import FfcvLoader
    built = build(converted[0], "ffcv", ramp=RAMP, rand_augment=RandAugment())  # not iterated: not compiled
    assert (built.rand_augment, built.seed, built.rank, built.ramp) == (RandAugment(), 3, 0, RAMP)
    compiled = ramp_run("ffcv").loader
    loader = FfcvLoader(compiled.loader, dtype=torch.float32, where=compiled.where, crops=compiled.crops,
                        image_size=IMAGE_SIZE, ramp=RAMP, rand_augment=built.rand_augment, seed=3, rank=0)
    del built
    calls = []
    augment = module.rand_augment

    def recorded(images, spec, generator):
        out = augment(images, spec, generator)
        calls.append((images.clone(), out.clone(), generator.initial_seed()))
        return out
    monkeypatch.setattr(module, "rand_augment", recorded)
    start = len(loader) - 2  # 2 batches: rand_augment takes ~0.5 s per batch on 2 busy cores
    yielded = first_batches(loader, epoch=1, start_batch=start, count=len(loader))
    assert len(calls) == len(yielded) == 2
    for batch, ((images, labels), (before, after, seed)) in enumerate(zip(yielded, calls), start=start):
        assert before.dtype == after.dtype == torch.uint8
        assert seed == module.batch_generator(CPU, 3, 1, 0, batch).initial_seed()
        check_batch(images, labels, image_size=SIZES[1], device=CPU, dtype=torch.float32,
                    num_classes=converted[1]["num_classes"])
        assert torch.equal(images, normalize(after, torch.float32))
        assert (before != after).flatten(1).any(1).float().mean() >= 0.5
