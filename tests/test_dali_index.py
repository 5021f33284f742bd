"""The dali loader's index reader (loaders/dali_source.py, the indexed_* graphs): torchvision's crop semantics drawn on
the host, the graph cutting exactly the host's windows, one pipeline across epochs, seeking, and the source's
read-ahead threads (the same batches, made off the training thread)."""
import gc
import io
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from pipelines import build_loader  # noqa: E402
from pipelines.loaders import dali_source  # noqa: E402
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipelines.formats.manifest import DatasetError, dali_shards, load_manifest  # noqa: E402

CPU = torch.device("cpu")
SIZE, BATCH = 64, 16


def dali(data, split="train", train=True, **kw):
    args = dict(batch_size=BATCH, image_size=SIZE, train=train, device=CPU, workers=2, seed=5) | kw
    return build_loader("dali", data, split, **args)


def epoch(batches, epoch_, start=0):
    batches.set_epoch(epoch_, start)
    return [(tuple(v.clone() for v in images) if isinstance(images, tuple) else images.clone(), labels.clone())
            for images, labels in batches]


def test_crops_follow_torchvision_random_resized_crop():
    """Same ranges and the same distribution as torchvision's get_params: for a 500 x 375 image the mean area
    share of 4,000 crops agrees within 0.02 (0.08-1 uniform, less the rejected draws); an image too narrow for
    any allowed ratio falls back to its centre, narrowed to the ratio range."""
    from torchvision.transforms import RandomResizedCrop
    rng = np.random.default_rng(0)
    n = 4000
    crops = dali_source.random_resized_crops(rng, np.full(n, 500), np.full(n, 375))
    x, y, w, h = crops.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 500).all() and (y + h <= 375).all() and (w > 0).all()
    assert (w / h).min() >= 0.74 and (w / h).max() <= 1.35
    torch.manual_seed(0)
    reference = [RandomResizedCrop.get_params(torch.empty(3, 375, 500), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ref_share = np.mean([ch * cw for _, _, ch, cw in reference]) / (500 * 375)
    assert abs((w * h).mean() / (500 * 375) - ref_share) < 0.02
    thin = dali_source.random_resized_crops(rng, np.array([1000]), np.array([10]))
    assert thin.tolist() == [[493, 0, 13, 10]]  # torchvision: h = 10, w = round(10 x 4/3), centred


def pil_crop(jpeg, x, y, w, h, mirror):
    """The reference: PIL crops the window, resizes it with its antialiasing bilinear filter, flips, normalizes."""
    image = Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB").crop((x, y, x + w, y + h))
    image = image.resize((SIZE, SIZE), Image.BILINEAR)
    if mirror:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = (np.asarray(image, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(array).permute(2, 0, 1)


def source(data, views=1):
    manifest = load_manifest(data)
    n = manifest["splits"]["train"]["samples"]
    plan = dali_source.Plan(samples=n, batch_size=BATCH, batches=n // BATCH, train=True, seed=5, rank=0, world_size=1)
    return dali_source.IndexedSource(dali_shards(data, manifest, "train"), plan, views=views)


def mean_error(images, references):
    return float(torch.stack([(a - b).abs().mean() for a, b in zip(images, references)]).mean())


def test_train_batch_is_the_host_window_decoded_and_resized(converted):
    """Batch 3 of epoch 0 against PIL cutting the windows the host drew for it. A mean error of 0.1 (normalized
    units, ~2 % of the range) allows for two resamplers; the window's x and y swapped would score ~0.5."""
    out = converted[0]
    images, labels = epoch(dali(out), 0)[3]
    jpegs, want_labels, start, shape, mirror = source(out)(SimpleNamespace(iteration=3))
    assert labels.tolist() == want_labels[:, 0].tolist()
    references = [pil_crop(j, *s, *wh, m) for j, s, wh, m in zip(jpegs, start, shape, mirror)]
    assert mean_error(images, references) < 0.1
    swapped = [pil_crop(j, s[1], s[0], wh[1], wh[0], m) for j, s, wh, m in zip(jpegs, start, shape, mirror)]
    assert mean_error(images, swapped) > 0.2  # the comparison tells the windows apart


def test_two_views_cut_the_host_windows(converted, monkeypatch):
    """With the colour draws set to 'no change', each view is its own window of the full decode, resized and
    flipped: fn.resize's ROI in (y, x) order cuts what the host drew."""
    def identity(rng, n):
        ones, off = np.ones(n, np.float32), np.zeros(n, bool)
        return {"brightness": ones, "contrast": ones, "saturation": ones, "hue": ones * 0, "blur": off,
                "sigma": ones}
    monkeypatch.setattr(dali_source, "simclr_colour", identity)
    out = converted[0]
    (first, second), labels = epoch(dali(out, views=2), 0)[1]
    drawn = dict(zip(dali_source.TWO_VIEW_OUTPUTS, source(out, views=2)(SimpleNamespace(iteration=1))))
    for v, images in enumerate((first, second)):
        references = [pil_crop(j, x, y, x1 - x, y1 - y, m) for j, (y, x), (y1, x1), m in
                      zip(drawn["jpegs"], drawn[f"roi_start{v}"], drawn[f"roi_end{v}"], drawn[f"mirror{v}"])]
        assert mean_error(images, references) < 0.1, v
    assert not torch.equal(first, second)


def counting(batches):
    """Counts the pipelines the loader builds."""
    builds = []
    make = batches.make_pipeline
    batches.make_pipeline = lambda at: builds.append(at) or make(at)
    return builds


def test_consecutive_epochs_run_on_one_pipeline_and_a_jump_rebuilds(converted):
    batches = dali(converted[0])
    builds = counting(batches)
    e0, e1 = epoch(batches, 0), epoch(batches, 1)
    assert builds == [0]  # epoch 1 came from the same pipeline, prefetched across the boundary
    assert [lab.tolist() for _, lab in e1] != [lab.tolist() for _, lab in e0]
    again = epoch(batches, 1, 2)  # not the continuation (that is epoch 2): a pipeline at epoch 1, batch 2
    assert builds == [0, len(batches) + 2]
    for (a, la), (b, lb) in zip(e1[2:], again):
        assert torch.equal(a, b) and torch.equal(la, lb)
    evals = dali(converted[0], "holdout", train=False)
    builds = counting(evals)
    assert [lab.tolist() for _, lab in epoch(evals, 0)] == [lab.tolist() for _, lab in epoch(evals, 1)]
    assert builds == [0]  # every evaluation reads one order: the running pipeline serves the next one


def test_an_epoch_depends_only_on_seed_and_epoch(converted):
    """Epoch 2 read after epochs 0 and 1 on one pipeline equals epoch 2 on a fresh loader: nothing is carried
    across the boundary (no shuffle buffer, no random operator state)."""
    running = dali(converted[0])
    epoch(running, 0), epoch(running, 1)
    for (a, la), (b, lb) in zip(epoch(running, 2), epoch(dali(converted[0]), 2)):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("reader", ["index", "webdataset"])
def test_a_fresh_loader_seeks_to_the_batches_of_an_uninterrupted_epoch(converted, reader):
    """The same pixels and labels from batch k on; the webdataset reader gets there by reading the batches before
    (it is seeded per epoch, so it is reproducible, but it cannot seek)."""
    options = {"reader": reader}
    whole = epoch(dali(converted[0], options=options), 1)
    k = len(whole) - 3
    resumed = epoch(dali(converted[0], options=options), 1, k)
    assert len(resumed) == 3
    for (a, la), (b, lb) in zip(whole[k:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def jpeg(size, **save):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_jpeg_size_reads_the_frame_header(converted):
    """Every stored image of the sample (baseline and re-encoded), a progressive JPEG and one with an EXIF
    segment before its frame header: the size PIL reads; anything else: None (the caller then asks PIL)."""
    from pipelines.formats.webdataset import ShardReader
    out = converted[0]
    reader = ShardReader(dali_shards(out, load_manifest(out), "train"))
    blobs = [reader.read(i)[0] for i in range(len(reader))]
    exif = Image.Exif()
    exif[0x010F] = "camera"
    blobs += [jpeg((321, 123), progressive=True), jpeg((77, 555), exif=exif.tobytes())]
    assert [dali_source.jpeg_size(b) for b in blobs] == [Image.open(io.BytesIO(b)).size for b in blobs]
    assert dali_source.jpeg_size(b"\x89PNG\r\n\x1a\n" + bytes(40)) is None
    assert dali_source.jpeg_size(jpeg((10, 10))[:20]) is None  # cut before its frame header


# --- the source's read-ahead (DaliOptions.feed_ahead, dali_source.FeedAhead) -----------------------------------

def on_threads(monkeypatch):
    """Records the thread that makes each batch of every IndexedSource: (position, thread name)."""
    made = []
    make = dali_source.IndexedSource.batch

    def recording(self, position):
        made.append((position, threading.current_thread().name))
        return make(self, position)
    monkeypatch.setattr(dali_source.IndexedSource, "batch", recording)
    return made


@pytest.mark.parametrize("ahead", [0, 3])
def test_read_ahead_yields_the_same_batches_off_the_training_thread(converted, monkeypatch, ahead):
    """feed_ahead 3 against 0 (each batch made when DALI asks, inside next()): the same pixels and labels across
    an epoch boundary and after a seek; with read-ahead no batch is made on the thread that iterates, and seeks
    reuse the source's threads (none started per pipeline)."""
    made = on_threads(monkeypatch)
    inline = dali(converted[0], options={"feed_ahead": 0})
    want = epoch(inline, 0) + epoch(inline, 1) + epoch(inline, 1, 4)
    made.clear()
    batches = dali(converted[0], options={"feed_ahead": ahead})
    got = epoch(batches, 0) + epoch(batches, 1) + epoch(batches, 1, 4)
    assert len(got) == len(want) == 2 * len(batches) + len(batches) - 4
    for (a, la), (b, lb) in zip(want, got):
        assert torch.equal(a, b) and torch.equal(la, lb)
    threads = {name for _, name in made}
    if ahead:
        assert threading.current_thread().name not in threads
        assert len(threads) <= ahead and all(name.startswith("dali-feed-ahead") for name in threads)
    else:
        assert threads == {threading.current_thread().name}


def test_read_ahead_makes_the_next_positions_on_its_threads_and_raises_where_asked():
    """Asked for position p, FeedAhead has p + 1 .. p + ahead under way on its own threads; asked elsewhere (a
    new pipeline at a seek), it drops the rest; an error making a position is raised when that one is asked for."""
    def make(position):
        if position == 7:
            raise DatasetError("sample 7 is damaged")
        return position, threading.current_thread().name
    ahead = dali_source.FeedAhead(2)
    position, thread = ahead(0, make)
    assert position == 0 and thread.startswith("dali-feed-ahead")
    assert sorted(ahead._pending) == [1, 2]
    assert ahead(1, make)[0] == 1 and sorted(ahead._pending) == [2, 3]
    assert ahead(6, make)[0] == 6 and sorted(ahead._pending) == [7, 8]  # 2 and 3 dropped
    with pytest.raises(DatasetError, match="sample 7"):
        ahead(7, make)
    assert ahead(7, lambda p: (p,)) == (7,)  # asked again (a new pipeline there): made again
    with pytest.raises(ValueError, match="ahead must be 0"):
        dali_source.IndexedSource([], None, views=1, ahead=-1)


def open_descriptors(directory) -> int:
    """This process's open descriptors of files in `directory`."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
        except OSError:  # the listing's own descriptor, closed since
            pass
    return found


def test_shard_files_serve_many_threads_and_close_their_descriptors(converted):
    """16 threads reading every sample at once through at most 2 descriptors each (each thread closing its own
    least recently used ones): the bytes the single-threaded reader gives; every descriptor closed with the
    source."""
    from pipelines.formats.webdataset import ShardReader
    out = converted[0]
    shards = dali_shards(out, load_manifest(out), "train")
    reader = ShardReader(shards)
    want = [reader.read(i)[0] for i in range(len(reader))]
    gc.collect()
    before = open_descriptors(shards[0][0].parent)
    files = dali_source.ShardFiles(reader.tars, threads=16)
    files.per_thread = 2
    errors, got = [], [None] * len(want)

    def read(offset):
        try:
            for i in range(offset, len(want), 16):
                shard, at, size, _ = (int(v) for v in reader.rows[i])
                got[i] = files.pread(shard, at, size)
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=read, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want
    assert open_descriptors(shards[0][0].parent) > before
    del files
    gc.collect()
    assert open_descriptors(shards[0][0].parent) == before
    with pytest.raises(OSError, match="truncated"):
        dali_source.ShardFiles(reader.tars, threads=1).pread(0, reader.rows[0][1], 10**9)


def test_an_epoch_order_is_drawn_once_for_all_threads(monkeypatch):
    """Eight threads asking for epoch 3's order at once: one permutation drawn, the same array for all; the two
    latest epochs kept."""
    drawn = []

    def slow(n, **kw):
        drawn.append(kw["epoch"])
        time.sleep(0.2)
        return np.arange(n) + kw["epoch"]
    monkeypatch.setattr(dali_source, "rank_indices", slow)
    plan = dali_source.Plan(samples=10, batch_size=2, batches=5, train=True, seed=0, rank=0, world_size=1)
    orders = dali_source.EpochOrders(plan)
    got = [None] * 8
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, orders(3))) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert drawn == [3] and all(g is got[0] for g in got) and got[0][0] == 3
    orders(4), orders(5), orders(4)
    assert drawn == [3, 4, 5]
    orders(3)
    assert drawn == [3, 4, 5, 3]


# --- handing DALI's buffers to torch (dali.Handoff) -------------------------------------------------------------

class FakeEvent:
    """torch.cuda.Event as Handoff uses it, on the CPU: `done` holds the events whose stream has reached them."""
    done, made = set(), []

    def __init__(self):
        self.waited = False
        FakeEvent.made.append(self)

    def record(self, stream):
        pass

    def query(self):
        return self in FakeEvent.done or self.waited

    def synchronize(self):
        self.waited = True


def test_dali_outputs_are_kept_until_the_copies_that_read_them_have_run(monkeypatch):
    """A batch's DALI outputs are let go only once the event after its copies has completed (checked without
    waiting, in order); the host waits for one only beyond HELD_BATCHES held, and for all when the pipeline goes.
    On the CPU nothing is held, and an fp32 batch is DALI's buffer itself (no queue can outlive it)."""
    from pipelines.loaders import dali as module
    monkeypatch.setattr(FakeEvent, "done", set())
    monkeypatch.setattr(FakeEvent, "made", [])
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    handoff = module.Handoff(torch.float32)
    gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    outputs = [{"images": gpu, "labels": gpu, "batch": k} for k in range(module.HELD_BATCHES + 4)]

    def held():
        return [out["batch"] for _, out in handoff._held]
    for out in outputs[:3]:
        handoff.keep(out)
    assert held() == [0, 1, 2]  # no copy has run yet
    FakeEvent.done |= {FakeEvent.made[0], FakeEvent.made[2]}
    handoff.keep(outputs[3])
    assert held() == [1, 2, 3]  # batch 0 let go; batch 2 waits behind batch 1
    for out in outputs[4:]:
        handoff.keep(out)
    assert len(held()) == module.HELD_BATCHES and held()[-1] == len(outputs) - 1
    assert [e.waited for e in FakeEvent.made[:4]] == [False, True, False, True]  # waited for beyond the bound only
    handoff.clear()
    assert held() == [] and all(e.query() for e in FakeEvent.made)

    cpu = {"images": torch.zeros(2, 4, 4, 3), "labels": torch.zeros(2, 1, dtype=torch.int32)}
    images = handoff.images(cpu["images"])
    assert images.data_ptr() == cpu["images"].data_ptr() and images.is_contiguous(memory_format=torch.channels_last)
    handoff.keep(cpu)
    assert held() == []
    assert module.Handoff(torch.bfloat16).images(cpu["images"]).dtype == torch.bfloat16
