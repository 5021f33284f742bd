"""The loaders' GPU paths: DALI's mixed decode (nvJPEG and the hardware decoder) and FFCV's ToDevice.
They skip themselves without a CUDA GPU; benchmarks/gpu_check.sh runs them on the GPU machine."""
import hashlib
from collections import Counter

import pytest
import torch

from pipelines import build_loader
from pipelines.contract import check_batch, check_views_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)


def read(converted, kind, split, *, train, device, dtype=torch.float32, **kw):
    loader = build_loader(kind, converted[0], split, batch_size=16, image_size=96, train=train, device=device,
                          dtype=dtype, workers=2, **kw)
    images, labels = zip(*loader)
    return loader, torch.cat(images).cpu().float(), torch.cat(labels).cpu()


@pytest.mark.parametrize("kind", ["dali", "ffcv", "torchvision", "synthetic"])
@pytest.mark.parametrize("train", [True, False])
def test_batches_on_the_gpu_follow_the_contract(converted, kind, train):
    loader = build_loader(kind, converted[0], "train" if train else "val", batch_size=16, image_size=96,
                          train=train, device=CUDA, dtype=torch.bfloat16, workers=2)
    seen = 0
    for images, labels in loader:
        check_batch(images, labels, image_size=96, device=CUDA, dtype=torch.bfloat16,
                    num_classes=converted[1]["num_classes"])
        seen += 1
    assert seen == len(loader)


@pytest.mark.parametrize("kind", ["dali", "ffcv"])
def test_gpu_eval_matches_the_cpu_reference(converted, kind):
    """Same tolerance as the CPU test (test_pipelines): 0.1 normalized ~ 6 grey levels; the GPU decoders
    (nvJPEG, the hardware decoder) round their IDCT and chroma upsampling differently from libjpeg-turbo."""
    _, reference, ref_labels = read(converted, "torchvision", "val", train=False, device="cpu")
    _, images, labels = read(converted, kind, "val", train=False, device=CUDA)
    assert labels.tolist() == ref_labels.tolist()
    mean_gap = (images.mean(dim=(2, 3)) - reference.mean(dim=(2, 3))).abs().max().item()
    pixel_gap = (images - reference).abs().mean(dim=(1, 2, 3)).max().item()
    assert mean_gap < 0.1 and pixel_gap < 0.2, (mean_gap, pixel_gap)


def test_dali_gpu_eval_across_two_ranks_reads_each_sample_once(converted):
    def fingerprints(**kw):
        _, images, _ = read(converted, "dali", "holdout", train=False, device=CUDA, **kw)
        return Counter(hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images)
    whole = fingerprints()
    parts = fingerprints(rank=0, world_size=2) + fingerprints(rank=1, world_size=2)
    assert parts == whole and sum(whole.values()) == converted[1]["splits"]["holdout"]["samples"]


@pytest.mark.parametrize("load", [0.0, 1.0])
def test_dali_decodes_with_and_without_the_hardware_decoder(converted, load):
    """hw_decoder_load 1.0 sends every image to the H100's NVJPG engines, 0.0 none: both must give a full,
    normalized epoch."""
    loader, images, labels = read(converted, "dali", "train", train=True, device=CUDA,
                                  options={"hw_decoder_load": load})
    assert len(labels) == len(loader) * 16 and images.std() > 0.5


@pytest.mark.parametrize("kind", ["dali", "ffcv"])
def test_two_views_on_the_gpu_follow_the_contract(converted, kind):
    """views=2 on the GPU: DALI's graph on 'mixed' and 'gpu' operators (its blur behind a per-sample `if`),
    FFCV's two decodes with the colour part in kornia on the GPU. Both views of a sample differ, also from
    each other's mirror image (tests/test_two_views.py measures ~0.8 normalized on average on the CPU)."""
    loader = build_loader(kind, converted[0], "train", batch_size=16, image_size=96, train=True, device=CUDA,
                          dtype=torch.bfloat16, workers=2, views=2)
    seen = 0
    for views, labels in loader:
        check_views_batch(views, labels, image_size=96, device=CUDA, dtype=torch.bfloat16,
                          num_classes=converted[1]["num_classes"])
        a, b = (view.float() for view in views)
        gap = torch.minimum((a - b).abs().mean(dim=(1, 2, 3)), (a - b.flip(3)).abs().mean(dim=(1, 2, 3)))
        assert gap.min() > 0.03, gap
        seen += 1
    assert seen == len(loader)
