"""What the dali loader's build() makes of its options and of the manifest (loaders/dali.py): an option the chosen
reader would ignore is refused before any work, the GPU decoder's preallocation follows each split's largest
stored image, and the webdataset reader's random draws differ between ranks while its sample order does not."""
import copy
import dataclasses
import re

import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines import build_loader, check_options  # noqa: E402
from pipelines.formats.manifest import load_manifest  # noqa: E402
from pipelines.formats.webdataset import ShardReader  # noqa: E402
from pipelines.loaders import dali, dali_graph  # noqa: E402
from pipelines.loaders import prelude as prelude_module  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("options,reader", [
    ({"shuffle_buffer": 1024}, "webdataset"),
    ({"read_ahead": True}, "webdataset"),
    ({"dont_use_mmap": False}, "webdataset"),  # given explicitly, even at its default
    ({"reader": "index", "shuffle_buffer": 4096}, "webdataset"),
    ({"reader": "webdataset", "feed_ahead": 0}, "index"),
])
def test_an_option_the_reader_ignores_is_refused_before_any_work(options, reader):
    """check_options (what training/run.py calls before a run starts) names the option and the reader that reads
    it; no dataset is needed to find out."""
    (name,) = [key for key in options if key != "reader"]
    chosen = options.get("reader", "index")
    message = f"option '{name}' of the 'dali' loader is read only by reader '{reader}', and this loader reads " \
              f"with reader '{chosen}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_options("dali", options)


@pytest.mark.parametrize("options", [{}, {"feed_ahead": 0}, {"feed_ahead": 8, "prefetch_queue_depth": 3},
                                     {"reader": "webdataset", "shuffle_buffer": 64, "read_ahead": True,
                                      "dont_use_mmap": True}])
def test_options_the_reader_reads_are_accepted(options):
    check_options("dali", options)
    assert dali.parse(options).feed_ahead == options.get("feed_ahead", 4)


def test_a_negative_read_ahead_is_refused():
    with pytest.raises(ValueError, match="option 'feed_ahead' of the 'dali' loader must be 0"):
        check_options("dali", {"feed_ahead": -1})


def with_manifest(monkeypatch, change):
    """The loaders read a copy of the manifest that `change(manifest)` edited."""
    load = prelude_module.load_manifest

    def changed(data):
        manifest = copy.deepcopy(load(data))
        change(manifest)
        return manifest
    monkeypatch.setattr(prelude_module, "load_manifest", changed)


def preallocations(monkeypatch, data, options=None) -> dict:
    """The side each split's pipeline pre-sizes its decoder for, as the graph receives it."""
    seen = []
    args = dali_graph._decoder_args
    monkeypatch.setattr(dali_graph, "_decoder_args",
                        lambda gpu, options, side: seen.append(side) or args(gpu, options, side))
    sides = {}
    for split, train in (("train", True), ("holdout", False), ("val", False)):
        batches = build_loader("dali", data, split, batch_size=4, image_size=32, train=train, device=CPU,
                               workers=1, seed=0, options=options)
        seen.clear()
        batches.make_pipeline(0)  # defines the graph: the decoder's arguments
        (sides[split],) = set(seen)
    return sides


def test_preallocation_follows_each_splits_largest_image(converted, monkeypatch):
    """Each split's own largest stored side (the manifest's splits[split]["largest_side"]) when the manifest has
    it; the conversion's --max-resolution for a manifest without it; the full-size default when that is 0; the
    option over all of them. On a GPU the side becomes the mixed decoder's width and height hints."""
    largest = {"train": 480, "holdout": 333, "val": 200}

    def per_split(manifest):
        for split, side in largest.items():
            manifest["splits"][split]["largest_side"] = side
    with monkeypatch.context() as patch:
        with_manifest(patch, per_split)
        assert preallocations(patch, converted[0]) == largest
        assert set(preallocations(patch, converted[0], {"preallocate_side": 1000}).values()) == {1000}

    def older(manifest):
        for info in manifest["splits"].values():
            info.pop("largest_side", None)
    with monkeypatch.context() as patch:
        with_manifest(patch, older)
        max_resolution = load_manifest(converted[0])["settings"]["max_resolution"]
        assert set(preallocations(patch, converted[0]).values()) == {max_resolution}

    def full_size(manifest):
        older(manifest)
        manifest["settings"]["max_resolution"] = 0
    with monkeypatch.context() as patch:
        with_manifest(patch, full_size)
        assert set(preallocations(patch, converted[0]).values()) == {dali.FULL_SIZE_SIDE}
    hints = dali_graph._decoder_args(True, dali_graph.DaliOptions(), 333)
    assert hints["preallocate_width_hint"] == hints["preallocate_height_hint"] == 333


def two_ranks_one_shard(monkeypatch):
    """Makes the train split's shard list its first shard twice, so that with 2 ranks both read the same samples
    (the webdataset reader gives rank r shard (r + epoch) % 2: either way, that shard)."""
    real = dali.prelude

    def doubled(*args, **kwargs):
        p = real(*args, **kwargs)
        first = p.shards[:1]
        n = len(ShardReader(list(first)))
        return dataclasses.replace(p, shards=first * 2, samples=2 * n, per_rank=n,
                                   batches=n // kwargs["batch_size"])
    monkeypatch.setattr(dali, "prelude", doubled)


def webdataset_epoch(data, rank: int, epoch: int = 1) -> list:
    batches = build_loader("dali", data, "train", batch_size=8, image_size=32, train=True, device=CPU, workers=1,
                           seed=3, rank=rank, world_size=2, options={"reader": "webdataset", "shuffle_buffer": 16})
    batches.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in batches]


def test_webdataset_ranks_draw_differently_in_the_same_order(converted, monkeypatch):
    """Two ranks reading the same samples: the same order (the shuffle buffer is seeded by (seed, epoch) alone),
    other crops and flips (the augmentation by (seed, epoch, rank)); a rank read again draws the same."""
    two_ranks_one_shard(monkeypatch)
    first, second, again = (webdataset_epoch(converted[0], rank) for rank in (0, 1, 0))
    assert len(first) == len(second) > 1
    assert [labels.tolist() for _, labels in first] == [labels.tolist() for _, labels in second]
    differ = sum(not torch.equal(a, b) for (a, _), (b, _) in zip(first, second))
    assert differ == len(first)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    other_epoch = webdataset_epoch(converted[0], 0, epoch=2)
    assert [labels.tolist() for _, labels in other_epoch] != [labels.tolist() for _, labels in first]
