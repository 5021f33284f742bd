"""What the dali loader raises when a batch cannot be made (loaders/dali.py's dali_errors, loaders/errors.py): a
fault of the data names the file and says to convert again; the device out of memory says what to lower; anything
else is raised as it was, with its own message and traceback.

Faults are injected into DALI's iterator (what DALI raises from a run) and into the index reader's source (on its
read-ahead threads), and put into the data (a JPEG damaged inside a shard). DALI's CPU decoder names neither the
sample nor its index in the batch ("nvImageCodec failure: '#4'"), so the index reader finds the culprit itself:
the failed batch's samples that PIL cannot decode either."""
import traceback

import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

from pipelines import build_loader  # noqa: E402
from pipelines.formats.manifest import RECONVERT, DatasetError, dali_shards, load_manifest  # noqa: E402
from pipelines.formats.webdataset import ShardReader  # noqa: E402
from pipelines.loaders import dali_source  # noqa: E402
from pipelines.loaders.errors import DeviceOutOfMemory  # noqa: E402

CPU = torch.device("cpu")
BATCH = 4  # 'val' has 30 samples: 8 batches
FAULT_AT = 2  # the batch a fault is injected into (the batches before it are yielded)


def dali(data, split="val", train=False, **kw):
    args = dict(batch_size=BATCH, image_size=32, train=train, device=CPU, workers=1, seed=0) | kw
    return build_loader("dali", data, split, **args)


def dali_error(operator: str, cause: str) -> RuntimeError:
    """A RuntimeError as DALI words one from a pipeline's run."""
    return RuntimeError(f"Critical error in pipeline:\nError in {operator},\nwhich was used in the pipeline definition "
                        f"with the following traceback:\n\n  File \"dali_graph.py\", line 1, in graph\n\n"
                        f"encountered:\n\n{cause}\nC++ context: [dali/pipeline/executor.cc:1]\n"
                        f"Current pipeline object is no longer valid.")


# name -> the error the iterator raises
FAULTS = {
    "decoder out of memory": lambda: dali_error("MIXED operator `nvidia.dali.fn.decoders.image_slice`",
                                                "nvJPEG error (5): NVJPEG_STATUS_ALLOCATOR_FAILURE"),
    "torch out of memory": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "a bug in an operator": lambda: dali_error("CPU operator `nvidia.dali.fn.resize`",
                                               "Assert on \"roi_end > roi_start\" failed"),
    "not DALI's": lambda: ValueError("a bug of the caller's"),
    "a decoder error on good data": lambda: dali_error("CPU operator `nvidia.dali.fn.decoders.image`",
                                                       "nvImageCodec failure: '#4'"),
}
OUT_OF_MEMORY = ("decoder out of memory", "torch out of memory")


def inject(monkeypatch, error, *, at: int = FAULT_AT) -> list:
    """DALI's iterator raises `error` where the loader asks it for batch `at` (its constructor fetches the first
    batch with one call more); the errors raised are collected in the returned list."""
    calls, raised = [], []
    passing = DALIGenericIterator.__next__

    def failing_next(self):
        calls.append(1)
        if len(calls) == at + 2:
            raised.append(error)
            raise error
        return passing(self)
    monkeypatch.setattr(DALIGenericIterator, "__next__", failing_next)
    return raised


def read(batches) -> tuple[int, BaseException | None]:
    """(batches yielded, what the epoch raised)."""
    count = 0
    try:
        for _ in batches:
            count += 1
    except Exception as error:
        return count, error
    return count, None


@pytest.mark.parametrize("reader", ["index", "webdataset"])
@pytest.mark.parametrize("fault", FAULTS)
def test_an_injected_fault_says_what_it_is(converted, monkeypatch, fault, reader):
    """Out of memory: a DeviceOutOfMemory naming the split and the settings that hold memory, not the data, with
    DALI's or torch's error chained. A decoder error where the data is fine: from the index reader, DALI's own
    error with a note (PIL decodes every sample of the batch); from the webdataset reader, which cannot tell
    which samples it read, a DatasetError naming the split's shards. Anything else: the very error raised, its
    traceback running through the code that raised it."""
    injected = inject(monkeypatch, FAULTS[fault]())
    count, error = read(dali(converted[0], options={"reader": reader}))
    assert count == FAULT_AT and error is not None and injected
    message = str(error)
    if fault in OUT_OF_MEMORY:
        assert type(error) is DeviceOutOfMemory and error.__cause__ is injected[0], f"{type(error)}: {error}"
        for part in ("split 'val'", "data.batch_size", "data.options.prefetch_queue_depth (2)",
                     "data.options.preallocate_side (512 px)", "device_memory_padding", "The data is fine"):
            assert part in message, message
        assert "convert again" not in message
    elif fault == "a decoder error on good data" and reader == "webdataset":
        assert type(error) is DatasetError and error.__cause__ is injected[0]
        for part in ("split 'val'", "nvidia.dali.fn.decoders.image: nvImageCodec failure", RECONVERT):
            assert part in message, message
    else:
        assert error is injected[0], f"{type(error)}: {error}"
        assert "failing_next" in [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        notes = getattr(error, "__notes__", [])
        if fault == "a decoder error on good data":
            assert len(notes) == 1 and "PIL decodes every sample" in notes[0] and "verify_dataset" in notes[0]
        else:
            assert not notes


def damage_jpeg(out, split: str, sample: int) -> str:
    """Zeroes the first bytes (the SOI marker) of a stored JPEG; returns how the loader must name it."""
    reader = ShardReader(dali_shards(out, load_manifest(out), split))
    shard, offset, _, _ = (int(v) for v in reader.rows[sample])
    with open(reader.tars[shard], "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 4)
    return reader.where(sample)


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_damaged_jpeg_is_a_dataset_error_naming_its_file(damaged, ahead):
    """A JPEG of 'val' that does not decode, in batch 2: DALI's decoder fails on that batch (the two before are
    yielded), and the error names the shard, the sample and its byte offset, DALI's cause and the fix."""
    where = damage_jpeg(damaged, "val", FAULT_AT * BATCH + 1)
    count, error = read(dali(damaged, options={"feed_ahead": ahead}))
    assert count == FAULT_AT
    assert type(error) is DatasetError, f"{type(error)}: {error}"
    for part in (where, "nvidia.dali.fn.decoders.image", "split 'val'", RECONVERT):
        assert part in str(error), str(error)


def test_a_damaged_jpeg_read_ahead_for_training_names_its_file(damaged):
    """In a train epoch the source reads each JPEG's header on a read-ahead thread: the error it raises there
    reaches the trainer (prefetch_queue_depth, 2, batches before that batch would), naming the file."""
    batches = dali(damaged, "train", train=True, options={"feed_ahead": 2})
    batches.set_epoch(0)
    order = dali_source.IndexedSource(dali_shards(damaged, load_manifest(damaged), "train"), dali_source.Plan(
        samples=load_manifest(damaged)["splits"]["train"]["samples"], batch_size=BATCH, batches=len(batches),
        train=True, seed=0, rank=0, world_size=1), views=1).indices(0, 3)
    where = damage_jpeg(damaged, "train", int(order[1]))
    count, error = read(batches)
    assert count == 3 - 2
    assert type(error) is DatasetError and where in str(error) and RECONVERT in str(error), f"{type(error)}: {error}"


def test_a_damaged_jpeg_read_by_the_webdataset_reader_names_the_shards(damaged):
    """The webdataset reader's batches come out of a shuffle buffer: the error names the split's shards."""
    damage_jpeg(damaged, "val", FAULT_AT * BATCH + 1)
    count, error = read(dali(damaged, options={"reader": "webdataset"}))
    assert type(error) is DatasetError, f"{type(error)}: {error}"
    for part in (str(damaged / "dali" / "val"), "nvidia.dali.fn.decoders.image", RECONVERT):
        assert part in str(error), str(error)


def test_a_bug_on_a_read_ahead_thread_reaches_the_trainer_as_it_was(converted, monkeypatch):
    """An error that is not the data's, raised where the source makes a batch on its thread: the same type and
    message, with the source's frame in its traceback. DALI asks its source for a batch prefetch_queue_depth (2)
    batches before it yields it, so the error comes that much earlier."""
    make = dali_source.IndexedSource.batch

    def buggy(self, position):
        if position == FAULT_AT + 1:
            raise RuntimeError("a bug in the source")
        return make(self, position)
    monkeypatch.setattr(dali_source.IndexedSource, "batch", buggy)
    count, error = read(dali(converted[0], options={"feed_ahead": 2}))
    assert count == FAULT_AT + 1 - 2
    assert type(error) is RuntimeError and str(error) == "a bug in the source"
    assert "buggy" in [frame.name for frame in traceback.extract_tb(error.__traceback__)]
