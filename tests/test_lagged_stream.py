"""A batch stays what it was however late the device reads it (CUDA only; skipped on the CPU).

On a GPU the training loop runs ahead of the device: a step queues its kernels and asks for the next batch before
the device has run them. A loader that reuses a buffer (FFCV's buffer slots, a pinned host buffer, a device
output buffer) while a copy or a kernel queued on it has not run yet hands out pixels of a later batch, and only
when the device lags: a test that waits for the device after each batch never sees it.

So, for each installed loader kind, a deterministic eval epoch is read twice from one loader, and checksums of
each batch (the sum of its images, of their absolute values, of its labels) are computed on the device and read
back once, at the end:
- the reference: the host waits for the device after every batch;
- lagged: a busy-wait kernel (torch.cuda._sleep) is queued on the current stream before each batch's checksum,
  several times longer than the loader takes to make a batch, so that the device falls batches behind the host
  and every read the loader queued after it (its copies, normalize) waits too.
The checksums must agree batch by batch (the labels' exactly, the images' within TOLERANCE of their absolute sum:
one pixel rounded otherwise by a GPU decoder is not a reused buffer, another image is), and the lagged epoch must
have left the device at least LAG_BATCHES batches behind the host at some point, or the check proved nothing.

On the CPU, where nothing is copied asynchronously, the ffcv loader's guard (ffcv.SlotGuard) is checked against a
simulated device instead: a stream whose events complete one by one, well after the host recorded them. FFCV's
decode thread must not start decoding into a buffer slot before the device has finished the batch that the slot
held; without the guard it does, and that is the race the GPU test would catch.
"""
import queue
import threading
import time

import pytest
import torch

from pipelines import KINDS, build_loader
from test_pipelines import CPU, EVAL_SIZE, LIBRARY, collect_garbage_at_the_end  # noqa: F401

# numba's Dispatcher finalizer raises KeyError when FFCV's compiled pipelines are garbage-collected (see
# test_pipelines).
pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: the lag is between the host and a CUDA stream")

CUDA = torch.device("cuda", 0)
SIMULATED_BATCH_TIME = 0.03  # s the simulated device spends on each batch: far longer than the host's
BATCH = 8  # the sample's 'train' split read in eval mode: 21 batches, four times FFCV's 5 buffer slots
LAG_PER_BATCH = 3.0  # the busy-wait, in multiples of the reference epoch's median interval (20-250 ms)
LAG_BATCHES = 2  # how far behind the host the device must have fallen at least
TOLERANCE = 1e-6  # of a batch's absolute sum: a few pixel levels (one image is several percent of it)


def needs(kind):
    if kind in LIBRARY:
        pytest.importorskip(LIBRARY[kind])


def sleep_cycles_per_ms() -> float:
    """torch.cuda._sleep spins for a number of GPU clock cycles: how many make a millisecond on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000)  # loads the kernel
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def checksums(loader, lag_cycles: int = 0) -> tuple[torch.Tensor, int, float]:
    """Per batch (images' sum, their absolute sum, labels' sum) as float64, read back once after the epoch; the
    most batches the device was behind the host when a batch arrived; the median interval between batches, in ms
    (the first batch's wait, FFCV's compilation included, left out).
    lag_cycles 0: the host waits for the device after each batch (the reference)."""
    sums, pending, behind, arrivals = [], [], 0, []
    for images, labels in loader:
        arrivals.append(time.perf_counter())
        while pending and pending[0].query():  # batches whose checksum the device has computed
            pending.pop(0)
        behind = max(behind, len(pending))
        if lag_cycles:
            torch.cuda._sleep(lag_cycles)
        images = images.double()
        sums.append(torch.stack([images.sum(), images.abs().sum(), labels.double().sum()]))
        if lag_cycles:
            pending.append(torch.cuda.Event())
            pending[-1].record()
        else:
            torch.cuda.synchronize()
    intervals = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    return torch.stack(sums).cpu(), behind, 1000 * intervals[len(intervals) // 2] if intervals else 0.0


@needs_cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_gpu_batches_survive_a_lagging_stream(converted, kind):
    needs(kind)
    loader = build_loader(kind, converted[0], "train", batch_size=BATCH, image_size=EVAL_SIZE, train=False,
                          device=CUDA, dtype=torch.float32, workers=2)
    reference, _, ms_per_batch = checksums(loader)
    assert len(reference) == len(loader)
    lag_ms = min(250.0, max(20.0, LAG_PER_BATCH * ms_per_batch))
    cycles = int(lag_ms * sleep_cycles_per_ms())
    lagged, behind, _ = checksums(loader, cycles)
    assert behind >= LAG_BATCHES, f"the device was at most {behind} batches behind the host: nothing was tested"
    assert len(lagged) == len(reference)
    gap = (lagged - reference).abs()
    wrong = [b for b in range(len(reference))
             if gap[b, 2] > 0 or gap[b, :2].max() > TOLERANCE * reference[b, 1]]
    assert not wrong, (f"{kind}: batches {wrong} of {len(reference)} changed when the device read them late "
                       f"(up to {behind} batches behind): a buffer was reused while a queued read still waited")


# --- the ffcv loader's guard against a simulated device (CPU) -------------------------------------------------

class SimulatedStream:
    """The device as FFCV's guard sees it: events complete in the order they were recorded, each
    SIMULATED_BATCH_TIME after the one before. `log` gets ("done", k) for the k-th event, before it completes."""

    def __init__(self, log: list):
        self.log, self.events = log, queue.Queue()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        for k in range(1 << 30):
            event = self.events.get()
            if event is None:
                return
            time.sleep(SIMULATED_BATCH_TIME)
            self.log.append(("done", k))
            event.completed.set()

    def close(self):
        self.events.put(None)
        self.thread.join()


def simulated_event(stream: SimulatedStream):
    """torch.cuda.Event's stand-in: record() queues it on `stream`; synchronize() waits for it on the host."""
    class Event:
        def __init__(self, **flags):
            self.completed = threading.Event()

        def record(self, stream_=None):
            stream.events.put(self)

        def synchronize(self):
            self.completed.wait()

        def query(self):
            return self.completed.is_set()
    return Event


class SimulatedCurrentStream:
    """torch.cuda.current_stream()'s stand-in: one stream, which FFCV's streams (none on the CPU) join at once."""

    def wait_stream(self, other):
        pass


@pytest.fixture(scope="module")
def ffcv_cpu_eval(converted):
    """An ffcv eval loader on the CPU over 'val', 15 batches of 2; compiled by its first epoch (~8 s)."""
    pytest.importorskip("ffcv")
    loader = build_loader("ffcv", converted[0], "val", batch_size=2, image_size=EVAL_SIZE, train=False,
                          device=CPU, workers=2)
    assert sum(1 for _ in loader) == len(loader) == 15
    return loader


SEEK = 2  # the guarded epoch starts at this batch: the guard counts the thread's batches, not the epoch's


@pytest.mark.parametrize("guarded", [True, False], ids=["the ffcv loader", "FFCV alone"])
def test_ffcv_decodes_into_a_slot_only_once_the_device_is_done_with_it(ffcv_cpu_eval, monkeypatch, guarded):
    """An eval epoch read by a host that never waits, from a device that takes SIMULATED_BATCH_TIME per batch:
    the ffcv loader, run as on a GPU (its guard on, CUDA's events and streams simulated), from batch SEEK on.
    Its FFCV thread starts the iterator's batch b + slots only after the device has finished batch b, and every
    batch arrives. FFCV alone (its iterator read directly, one event recorded per batch taken) starts it while
    the device is still batches behind: the case the guard is for."""
    loader = ffcv_cpu_eval
    slots = loader.loader.batches_ahead + 2
    log = []
    stream = SimulatedStream(log)
    monkeypatch.setattr(torch.cuda, "Event", simulated_event(stream))
    monkeypatch.setattr(torch.cuda, "current_stream", SimulatedCurrentStream)
    context = loader.loader.memory_manager.schedule_epoch([])  # os_cache: one context, every epoch
    start_batch = context.start_batch

    def logged_start_batch(batch):  # called by FFCV's thread as it starts decoding `batch`, after the guard
        log.append(("decode", batch))
        return start_batch(batch)
    monkeypatch.setattr(context, "start_batch", logged_start_batch)
    try:
        if guarded:
            monkeypatch.setattr(loader, "on_device", True)
            loader.set_epoch(0, SEEK)
            taken = sum(1 for _ in loader)
            assert loader.running.slot_guard.error is None
        else:  # the same epoch from FFCV's own iterator (start's guard is off for a loader on the CPU)
            taken = 0
            for _ in loader.start(0, SEEK):
                torch.cuda.Event().record()
                taken += 1
    finally:
        stream.close()
    batches = len(loader) - SEEK
    assert taken == batches
    early = [b for b in range(slots, batches) if log.index(("decode", b)) < log.index(("done", b - slots))]
    if guarded:
        assert not early, f"batches {early} were decoded into a slot the device had not finished with"
    else:
        assert early, "FFCV alone waited for the device: the guarded case above proves nothing"


def test_ffcv_refuses_an_unbounded_queue(converted):
    """The guard's argument needs FFCV's queue bounded: batches_ahead 0 makes it unbounded (queue.Queue(0)), and
    FFCV's thread would then decode into slots whose batches were never taken."""
    pytest.importorskip("ffcv")
    with pytest.raises(ValueError, match="option 'batches_ahead' of the 'ffcv' loader must be at least 1, got 0"):
        build_loader("ffcv", converted[0], "val", batch_size=2, image_size=EVAL_SIZE, train=False, device=CPU,
                     options={"batches_ahead": 0})
