"""What a loader raises when a batch cannot be made (pipelines/loaders/errors.py): only a fault of the data says
"convert again" and names the file; the device out of memory says what to lower; anything else (a bug in
RandAugment, say) is raised as it was, with its own message and traceback.

Each fault is injected where it happens: into the device side of the ffcv and torchvision loaders (what they
call after the copy: contract.normalize, RandAugment), into FFCV's decode thread, and into the data (a .beton
gone since the build, a JPEG damaged inside a .beton). On the CPU: the rules do not depend on the device.
FFCV compiles each new Loader on its first epoch (~8 s), so the module reads one compiled eval loader.
"""
import errno
import threading
import traceback

import pytest
import torch

from pipelines.contract import RandAugment
from pipelines.formats.manifest import RECONVERT, DatasetError
from pipelines.loaders.errors import DeviceOutOfMemory
from test_pipelines import EVAL_SIZE, TRAIN_SIZE, collect_garbage_at_the_end, loader, needs  # noqa: F401

# numba's Dispatcher finalizer raises KeyError when FFCV's compiled pipelines are garbage-collected (see
# test_pipelines).
pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")

EVAL_BATCH = 4  # 'val' has 30 samples: 8 batches, more than FFCV's batches_ahead + 2 = 5 buffer slots
THREAD_FAULT_AT = 6  # a batch FFCV's thread decodes into a reused slot, after the consumer took two batches
RECONVERT_HINT = "convert again"
assert RECONVERT.startswith(RECONVERT_HINT)

# name -> (the error raised, the error the loader must raise)
FAULTS = {
    "torch out of memory": (lambda: torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
        "1.25 GiB is free."), DeviceOutOfMemory),
    "CUDA error out of memory": (lambda: RuntimeError("CUDA error: out of memory"), DeviceOutOfMemory),
    "a bug": (lambda: RuntimeError("index 3 is out of bounds for dimension 0 with size 3"), RuntimeError),
}


def consume(batches, timeout: float = 120.0) -> tuple[int, BaseException | None]:
    """Reads an epoch in a helper thread: (batches yielded, what the iteration raised). Fails when the epoch
    neither ends nor raises within `timeout` s: a loader that waits forever for a batch that never comes."""
    outcome = {"batches": 0, "error": None}

    def read():
        try:
            for _ in batches:
                outcome["batches"] += 1
        except Exception as error:
            outcome["error"] = error
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"the loader neither yielded nor raised for {timeout:.0f} s after batch " \
                                  f"{outcome['batches']}: an error that never reached the consumer?"
    return outcome["batches"], outcome["error"]


def raising(fault: str, *, after: int = 0):
    """A stand-in for a function the loader calls: it raises FAULTS[fault]'s error on call `after` (0: the first),
    the calls before it pass through to `passing` when the caller sets one."""
    make_error, _ = FAULTS[fault]
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise make_error()
        return broken.passing(*args, **kwargs)
    broken.passing = None
    return broken


def check(error: BaseException | None, fault: str, *, where: str, knobs: str, raised_in: str) -> None:
    """The error a loader raised for the injected `fault`: an out of memory names `where` and the knobs to lower
    and not the data; anything else is the injected error itself, raised from `raised_in`."""
    expected = FAULTS[fault][1]
    assert error is not None, "the loader raised nothing"
    if expected is DeviceOutOfMemory:
        assert type(error) is DeviceOutOfMemory, f"{type(error).__name__}: {error}"
        message = str(error)
        for part in (where, "data.batch_size", knobs, "The data is fine"):
            assert part in message, message
        assert RECONVERT_HINT not in message, message
        assert type(error.__cause__) is type(FAULTS[fault][0]())  # the library's own error, chained
    else:
        assert type(error) is RuntimeError and str(error) == str(FAULTS[fault][0]()), f"{type(error)}: {error}"
        assert raised_in in [frame.name for frame in traceback.extract_tb(error.__traceback__)]


# --- ffcv -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ffcv_eval(converted):
    """(eval loader over 'val', the batches of an epoch it read before any fault was injected), compiled."""
    needs("ffcv")
    batches = loader(converted[0], "ffcv", "val", train=False, batch_size=EVAL_BATCH)
    return batches, [(images.clone(), labels.clone()) for images, labels in batches]


@pytest.mark.parametrize("fault", FAULTS)
def test_ffcv_device_side_faults(ffcv_eval, monkeypatch, fault):
    """normalize (after FFCV's copy) fails on the first batch: an out of memory names what to lower, not the
    data (FFCV's buffers: batches_ahead); a bug keeps its own type, message and traceback."""
    import pipelines.loaders.ffcv as module
    batches, _ = ffcv_eval
    monkeypatch.setattr(module, "normalize", raising(fault))
    count, error = consume(batches)
    assert count == 0
    check(error, fault, where="val.beton", knobs="data.options.batches_ahead (3)", raised_in="broken")


@pytest.mark.parametrize("fault", ["an I/O error", "no memory", "a bug"])
def test_ffcv_decode_thread_faults_reach_the_consumer(ffcv_eval, monkeypatch, fault):
    """An error in FFCV's decode thread (here where it starts decoding a batch: FFCV's memory context, which
    reads the .beton's pages when os_cache is off) ends the epoch there and is raised in the consumer, after the
    batches decoded before it: an OSError is the .beton's fault, a MemoryError says what to lower, anything else
    is raised as it was. Without that, the thread dies and the consumer waits for its next batch forever."""
    batches, read_before = ffcv_eval
    context = batches.loader.memory_manager.schedule_epoch([])  # os_cache: one context, every epoch
    errors = {"an I/O error": OSError(errno.EIO, "Input/output error"), "no memory": MemoryError(),
              "a bug": RuntimeError("a bug in a decoder")}
    start_batch = context.start_batch

    def failing_start_batch(batch):
        if batch == THREAD_FAULT_AT:
            raise errors[fault]
        return start_batch(batch)
    monkeypatch.setattr(context, "start_batch", failing_start_batch)
    count, error = consume(batches)
    assert count == THREAD_FAULT_AT < len(read_before)
    if fault == "an I/O error":
        assert type(error) is DatasetError and error.__cause__ is errors[fault], error
        for part in ("val.beton", "Input/output error", RECONVERT):
            assert part in str(error), error
    elif fault == "no memory":
        assert type(error) is DeviceOutOfMemory and "data.options.batches_ahead" in str(error), error
    else:
        assert error is errors[fault]
        assert "failing_start_batch" in [frame.name for frame in traceback.extract_tb(error.__traceback__)]


def test_ffcv_reads_its_epochs_after_a_fault(ffcv_eval):
    """The faults above leave the loader whole: the next epoch yields what the first one did."""
    batches, read_before = ffcv_eval
    again = [(images.clone(), labels.clone()) for images, labels in batches]
    assert len(again) == len(read_before)
    for (images, labels), (want_images, want_labels) in zip(again, read_before):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_ffcv_beton_gone_since_the_build_is_a_dataset_error(damaged):
    """FFCV maps the .beton when the first epoch starts: a file removed since the build is named, with the fix."""
    needs("ffcv")
    batches = loader(damaged, "ffcv", "val", train=False, batch_size=EVAL_BATCH)
    (damaged / "ffcv" / "val.beton").unlink()
    count, error = consume(batches)
    assert count == 0 and type(error) is DatasetError, error
    for part in ("val.beton", "FileNotFoundError", RECONVERT):
        assert part in str(error), error


def test_ffcv_decodes_a_damaged_jpeg_without_an_error(ffcv_eval, damaged):
    """FFCV does not check libjpeg-turbo's status: a JPEG zeroed inside the .beton (the file keeps its size)
    decodes into other pixels, with no error, and the other images stay as they were. That damage is
    tools/verify_dataset.py's to find, by the .beton's sha256 (docs/loaders.md, "Errors")."""
    from ffcv.reader import Reader

    from pipelines.formats.verify import verify
    _, reference = ffcv_eval
    beton = damaged / "ffcv" / "val.beton"
    reader = Reader(str(beton))
    image_field = f"f{reader.field_names.index('image')}"
    pointer = int(reader.metadata[image_field]["data_ptr"][0])  # eval reads sample 0 first
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == pointer][0])
    with open(beton, "r+b") as f:
        f.seek(pointer)
        f.write(b"\0" * size)
    batches = loader(damaged, "ffcv", "val", train=False, batch_size=EVAL_BATCH)
    read = [(images.clone(), labels.clone()) for images, labels in batches]  # no error
    assert len(read) == len(reference)
    images, want = torch.cat([images for images, _ in read]), torch.cat([images for images, _ in reference])
    assert not torch.equal(images[0], want[0])  # sample 0: other pixels
    assert torch.equal(images[1:], want[1:])  # every other sample: the same
    assert any("val.beton" in problem and "sha256" in problem for problem in verify(damaged))


# --- torchvision ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
def test_torchvision_device_side_faults(converted, monkeypatch, fault):
    """The same rules on torchvision's device side: normalize fails on the first batch. Its workers name a
    sample that does not decode themselves (test_pipelines: test_damaged_data_is_a_dataset_error_naming_it)."""
    import pipelines.loaders.torchvision as module
    batches = loader(converted[0], "torchvision", "val", train=False, image_size=EVAL_SIZE, workers=0)
    monkeypatch.setattr(module, "normalize", raising(fault))
    count, error = consume(batches)
    assert count == 0
    check(error, fault, where="split 'val'", knobs="data.image_size", raised_in="broken")


@pytest.mark.parametrize("fault", ["torch out of memory", "a bug"])
def test_torchvision_rand_augment_faults(converted, monkeypatch, fault):
    """RandAugment (on the device, before normalize) fails on the second batch, after one batch went through."""
    from pipelines import rand_augment as module
    batches = loader(converted[0], "torchvision", "train", image_size=TRAIN_SIZE, workers=0, batch_size=4,
                     rand_augment=RandAugment())
    broken = raising(fault, after=1)
    broken.passing = module.rand_augment
    monkeypatch.setattr(module, "rand_augment", broken)
    count, error = consume(batches)
    assert count == 1
    check(error, fault, where="split 'train'", knobs="data.image_size", raised_in="broken")
