"""The loader contract, on the CPU, for the kinds built so far (torchvision baseline, synthetic bound)."""
import numpy as np
import pytest
import torch

from pipelines import build_loader
from pipelines.contract import check_batch, normalize, rank_indices
from pipelines.formats.manifest import DatasetError
from pipelines.torchvision_ref import transforms
from test_convert import shard_samples

CPU = torch.device("cpu")


def loader(converted, kind, split="train", train=True, **kw):
    args = dict(batch_size=16, image_size=64, train=train, device=CPU, workers=0) | kw
    return build_loader(kind, converted[0], split, **args)


@pytest.mark.parametrize("kind", ["torchvision", "synthetic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_follow_the_contract(converted, kind, dtype):
    out, manifest = converted
    batches = loader(converted, kind, dtype=dtype)
    assert len(batches) == manifest["splits"]["train"]["samples"] // 16
    seen = 0
    for images, labels in batches:
        check_batch(images, labels, image_size=64, device=CPU, dtype=dtype, num_classes=manifest["num_classes"])
        seen += 1
    assert seen == len(batches)


def test_eval_reads_every_sample_once_in_stored_order(converted):
    out, manifest = converted
    labels = torch.cat([labels for _, labels in loader(converted, "torchvision", "val", train=False)])
    assert labels.tolist() == [label for _, label, _ in shard_samples(out, "val")]


def test_eval_across_ranks_covers_the_split_without_duplicates(converted):
    n = converted[1]["splits"]["holdout"]["samples"]
    parts = [rank_indices(n, rank=r, world_size=3, train=False, seed=0, epoch=0) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    sizes = [sum(len(lab) for _, lab in loader(converted, "torchvision", "holdout", train=False, rank=r, world_size=3))
             for r in range(3)]
    assert sizes == [len(p) for p in parts] and sum(sizes) == n


def test_train_order_is_reshuffled_per_epoch_and_reproducible(converted):
    def labels(epoch, seed=0):
        batches = loader(converted, "torchvision", seed=seed)
        batches.set_epoch(epoch)
        return torch.cat([lab for _, lab in batches]).tolist()
    assert labels(0) == labels(0) and labels(0) != labels(1) and labels(0) != labels(0, seed=1)
    n = converted[1]["splits"]["train"]["samples"]
    a, b = (set(rank_indices(n, rank=r, world_size=2, train=True, seed=0, epoch=3).tolist()) for r in (0, 1))
    assert not a & b and len(a) == len(b) == n // 2


def test_eval_image_is_the_stored_jpeg_resized_and_center_cropped(converted):
    import io

    from PIL import Image
    out, _ = converted
    images, _ = next(iter(loader(converted, "torchvision", "val", train=False)))
    jpeg = shard_samples(out, "val")[0][2]
    expected = transforms(64, train=False)(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert expected.shape == (3, 64, 64) and expected.dtype == torch.uint8
    assert torch.allclose(images[0], normalize(expected[None], torch.float32)[0], atol=1e-5)


def test_worker_processes_give_the_same_batches(converted):
    one = [lab for _, lab in loader(converted, "torchvision", "holdout", train=False, workers=0)]
    two = [lab for _, lab in loader(converted, "torchvision", "holdout", train=False, workers=2)]
    assert [t.tolist() for t in one] == [t.tolist() for t in two]


def test_bad_requests_are_clear_errors(converted, clean_tree, tmp_path):
    with pytest.raises(ValueError, match="unknown loader 'tfrecord'; choose from torchvision, synthetic"):
        loader(converted, "tfrecord")
    with pytest.raises(DatasetError, match="no split 'test'"):
        loader(converted, "torchvision", "test")
    from conftest import quiet
    from pipelines.formats.convert import ConvertSettings, convert
    convert(clean_tree[0], tmp_path / "ffcv_only", ConvertSettings(formats=("ffcv",)), workers=1, console=quiet())
    with pytest.raises(DatasetError, match="--formats ffcv,dali"):
        build_loader("torchvision", tmp_path / "ffcv_only", "train", batch_size=4, image_size=32, train=True,
                     device=CPU)
