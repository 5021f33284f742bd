"""DeiT's recipe in the trainer: mixup/cutmix and random erasing on the device (training/batch_augment.py),
the EMA of the weights, drop path, the resolution ramp (each planned size once per epoch, evaluation at the final
size, one compiled graph per size, checkpoints that load at the final size), and tiny_cpu_deit learning through
dali and ffcv. RandAugment itself is tested with the loaders (test_rand_augment.py, test_dali_augment.py)."""
import json

import pytest
import timm
import torch

from training import checkpoint
from training import model as models
from training import run as trainer
from training.batch_augment import BatchAugment
from training.randomness import seed_step
from training.config import AugmentConfig, load_config
from training.run import main

LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def args(converted, run_dir, *extra, preset="tiny_cpu", loader="torchvision", epochs=2):
    return ["--preset", preset, "--data", str(converted[0]), "--loader", loader, "--epochs", str(epochs),
            "--batch-size", "16", "--workers", "1", "--out", str(run_dir.parent), "--name", run_dir.name, *extra]


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def constant_batch(n=64, classes=8, size=16):
    """Image i is filled with the value i and has label i % classes: a mixed pixel tells which images it mixes."""
    values = torch.arange(n, dtype=torch.float32)
    images = values.view(n, 1, 1, 1).expand(n, 3, size, size).contiguous(memory_format=torch.channels_last)
    return images, torch.arange(n) % classes


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_and_match_the_mixed_pixels(kind):
    """Each image i is mixed with image n-1-i (timm's batch mode: the batch flipped). The target's weight on i's
    class must be the share of i's pixels: lam for mixup (pixel = lam x i + (1 - lam) x (n-1-i)), the area
    outside the pasted box for cutmix."""
    config = AugmentConfig(mixup=0.8 if kind == "mixup" else 0.0, cutmix=1.0 if kind == "cutmix" else 0.0)
    augment = BatchAugment(config, num_classes=64, label_smoothing=0.0)
    n = 64
    for step in range(5):
        seed_step(3, 0, step)
        images, labels = constant_batch(n, classes=64)
        mixed, targets = augment(images, labels)
        assert targets.shape == (n, 64) and torch.allclose(targets.sum(1), torch.ones(n))
        own = targets[torch.arange(n), labels]
        partner = targets[torch.arange(n), labels.flip(0)]
        i = torch.arange(n)
        if kind == "mixup":  # the pixel is lam x i + (1 - lam) x (n-1-i); n is even, so i != n-1-i
            pixel_share = (mixed[:, 0, 0, 0] - (n - 1 - i)) / (2 * i - (n - 1))
        else:
            pixel_share = (mixed[:, 0] == i.view(n, 1, 1)).float().mean((1, 2))
        assert torch.allclose(own, pixel_share, atol=1e-4), (step, own, pixel_share)
        assert torch.allclose(own + partner, torch.ones(n))
    assert not torch.equal(images, mixed)  # the loader's batch is left as it was handed over
    assert torch.equal(images, constant_batch(n, classes=64)[0])


def test_erasing_is_per_image_at_its_probability_and_seeded_by_step():
    """p 0.25 over 512 images: binomial sd 2 %, so 25 % +- 7 % fails a batch-wide or missing draw. The same
    (seed, rank, step) gives the same batch (a resumed run), the next step another, and another rank another
    (each rank of a DDP run draws its own)."""
    augment = BatchAugment(AugmentConfig(erasing=0.25), num_classes=8, label_smoothing=0.0)
    images = torch.zeros(512, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(512, dtype=torch.int64)

    def erased_at(rank, step):
        seed_step(0, rank, step)
        out, same_labels = augment(images, labels)
        assert torch.equal(same_labels, labels)
        return out

    erased = erased_at(0, 0)
    share = (erased != 0).flatten(1).any(1).float().mean().item()
    assert 0.18 < share < 0.32, share
    torch.manual_seed(123)  # whatever ran before: the step's seeding decides
    assert torch.equal(erased_at(0, 0), erased)
    assert not torch.equal(erased_at(0, 1) != 0, erased != 0)
    assert not torch.equal(erased_at(1, 0) != 0, erased != 0)


def test_the_ema_differs_moves_toward_the_weights_and_is_what_best_pt_holds(converted, tmp_path):
    """One evaluation (epoch 2 of 2) with best_on=ema: best.pt must hold the EMA weights, saved in last.pt beside
    the raw ones, and its figures must be the EMA evaluation's."""
    run = tmp_path / "ema"
    assert main(args(converted, run, "--set", "train.ema_decay=0.9", "--set", "train.best_on=ema",
                     "--set", "train.eval_every=2", loader="synthetic")) == 0
    last = checkpoint.load(run / "checkpoints" / checkpoint.LAST)
    best = checkpoint.load(run / "checkpoints" / checkpoint.BEST)
    raw, ema = last["model"], last["model_ema"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert all(torch.equal(best["model"][k], ema[k]) for k in ema) and best["weights"] == "ema"
    evals = records(run, "eval")
    ema_holdout = next(r for r in evals if r["weights"] == "ema" and r["split"] == "holdout")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["top1"] == ema_holdout["top1"] and summary["best"]["weights"] == "ema"
    assert summary["final_ema"]["holdout"]["top1"] == ema_holdout["top1"]
    # moves toward the weights: one more update from the trained weights brings the EMA closer to them
    from timm.utils import ModelEmaV3
    model = timm.create_model("vit_tiny_patch16_224", num_classes=6, img_size=32, patch_size=4, depth=4)
    model.load_state_dict(raw)
    average = ModelEmaV3(model, decay=0.9)
    average.module.load_state_dict(ema)
    before = sum((average.module.state_dict()[k] - raw[k]).float().norm() for k in raw)
    average.update(model, step=100)
    after = sum((average.module.state_dict()[k] - raw[k]).float().norm() for k in raw)
    assert after < 0.95 * before


def test_a_ramp_run_logs_each_planned_size_evaluates_at_the_final_size_and_loads_in_timm(converted, tmp_path,
                                                                                          monkeypatch):
    """A ramp 16 -> 32 px over epochs 0-2 (step 8) with the synthetic loader: 16, 24, 32 px, logged with each
    train line; evaluation sees 32 px only; best.pt loads into timm.create_model at 32 px and runs there."""
    seen = []
    real = trainer.evaluate

    def spy(model, batches, **kwargs):
        batches = list(batches)
        seen.extend(images.shape[-1] for images, _ in batches)
        return real(model, batches, **kwargs)
    monkeypatch.setattr(trainer, "evaluate", spy)
    run = tmp_path / "ramp"
    assert main(args(converted, run, "--set", "data.ramp={start_size: 16, start_epoch: 0, end_epoch: 2, step: 8}",
                     "--set", "train.log_every=2", loader="synthetic", epochs=4)) == 0
    sizes = {}
    for line in records(run, "train"):
        sizes.setdefault(line["epoch"], set()).add(line["image_size"])
    assert sizes == {0: {16}, 1: {24}, 2: {32}, 3: {32}}
    assert seen and set(seen) == {32}
    best = checkpoint.load(run / "checkpoints" / checkpoint.BEST)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=best["num_classes"], img_size=32, patch_size=4,
                              depth=4)
    model.load_state_dict(best["model"])  # strict: the 32-px position embedding, not an interpolated one
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, best["num_classes"])


def test_torch_compile_builds_one_graph_per_ramp_size():
    """dynamic=False with the ramp's sizes: each size compiles once, the second batch at a size reuses it, and
    the recompile limit is raised to fit a ramp longer than torch's default of 8."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    config = load_config("tiny_cpu", ["model.compile=true"]).model
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=4, depth=1,
                              dynamic_img_size=True)
    sizes = [8, 12, 16, 20, 24, 28, 32, 36, 40, 44]  # 10 sizes: more than the default limit
    compiled = models.compile_for_training(model, config, sizes=len(sizes), backend=counter)
    for size in sizes:
        for _ in range(2):
            compiled(torch.randn(2, 3, size, size))
    assert counter.frame_count == len(sizes)
    torch._dynamo.reset()


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_tiny_cpu_deit_learns(converted, tmp_path, loader):
    """RandAugment in the loader, mixup/cutmix, erasing, drop path, EMA and a 24 -> 32 px ramp, 8 epochs on the
    quirky sample's 6 classes: chance is 17 %; the EMA's holdout top-1 must be well above it."""
    pytest.importorskip(LIBRARY[loader])
    run = tmp_path / loader
    assert main(args(converted, run, preset="tiny_cpu_deit", loader=loader, epochs=8)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["weights"] == "ema"
    assert summary["best"]["top1"] >= 0.4, summary
    sizes = {line["epoch"]: line["image_size"] for line in records(run, "train")}
    assert [sizes[e] for e in range(8)] == [24, 24, 32, 32, 32, 32, 32, 32]
