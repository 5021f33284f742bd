"""Self-supervised objectives (SimCLR, rotation), k-NN evaluation and transfer (--init, --finetune,
--freeze-blocks) on the CPU.

The runs use their own small sample (conftest.py's ssl_data): 8 classes x 40 images, converted at 64 px (the tiny
model trains at 32 px, so decoding the usual 500 px images would only cost time): 288 train, 32 holdout, 48 val
images. Everything is
seeded and the torchvision loader seeds each sample's augmentation, so each figure below is the same on every
run on a machine; the margins only have to absorb float differences between machines.
"""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT
from pipelines import build_loader
from training import checkpoint, knn
from training.config import config_from_dict, load_config
from training.objectives import backbone_of, build_network, build_objective, info_nce, rotate
from training.optim import build_optimizer
from training.run import main

LOADER = ["--loader", "torchvision", "--workers", "1"]


def run(data, run_dir, *extra, preset="tiny_cpu"):
    return main(["--preset", preset, "--data", str(data), *LOADER, "--out", str(run_dir.parent),
                 "--name", run_dir.name, *extra])


@pytest.fixture(scope="module")
def pretrained(ssl_data, tmp_path_factory):
    """tiny_cpu_simclr for 4 epochs (36 steps of 32 images, ~25 s on 2 cores), at lr 3e-3: on this small sample
    that reached the k-NN figures of the preset's lr on the demo sample in the fewest epochs."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "simclr"
    assert run(ssl_data, run_dir, "--epochs", "4", "--lr", "3e-3", "--set", "train.eval_every=4",
               preset="tiny_cpu_simclr") == 0
    return run_dir


def knn_correct(model, data) -> tuple[int, int, dict]:
    """k-NN with the trainer's code: bank = train (eval transforms), queries = holdout + val."""
    common = dict(batch_size=64, image_size=32, train=False, device="cpu", workers=1)
    bank = build_loader("torchvision", data, "train", **common)
    queries = {split: build_loader("torchvision", data, split, **common) for split in ("holdout", "val")}
    results = knn.evaluate(model, bank, queries, num_classes=8, k=20, temperature=0.07,
                           autocast=contextlib.nullcontext)
    correct = sum(round(r["knn_top1"] * r["samples"]) for r in results.values())
    return correct, sum(r["samples"] for r in results.values()), results


# --- the loss --------------------------------------------------------------------------------------------------

def nt_xent_by_the_formula(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t), one anchor at a time, in float64."""
    z = torch.cat([z1, z2]).double()
    n = z.shape[0]

    def s(a, b):
        return torch.dot(z[a], z[b]) / (z[a].norm() * z[b].norm())
    losses = []
    for i in range(n):
        j = (i + n // 2) % n
        denominator = sum(torch.exp(s(i, k) / t) for k in range(n) if k != i)
        losses.append(-torch.log(torch.exp(s(i, j) / t) / denominator))
    return torch.stack(losses)


@pytest.mark.parametrize("t", [0.07, 0.2, 0.5, 1.0])
def test_info_nce_equals_the_formula(t):
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    expected = nt_xent_by_the_formula(z1, z2, t)
    z = torch.cat([z1, z2])
    per_anchor = info_nce(z, t, reduction="none")
    assert torch.allclose(per_anchor.double(), expected, rtol=1e-5), (per_anchor, expected)
    assert torch.allclose(info_nce(z, t).double(), expected.mean(), rtol=1e-5)
    # The scale of an embedding does not matter (cosine), its direction does.
    assert torch.allclose(info_nce(z * 3.0, t), info_nce(z, t), rtol=1e-5)


def test_info_nce_by_hand():
    """4 orthogonal directions, t = 0.2. Views that match: each anchor's positive has similarity 1 (e^5) and its
    6 negatives 0, so l = log(1 + 6 e^-5). Pairs shifted by one: the positive is orthogonal and the anchor's twin
    is a negative, l = log(e^5 + 6)."""
    z1 = torch.eye(4) * 3
    matched = info_nce(torch.cat([z1, z1]), 0.2)
    shifted = info_nce(torch.cat([z1, z1.roll(1, dims=0)]), 0.2)
    assert abs(matched.item() - math.log(1 + 6 * math.exp(-5))) < 1e-6
    assert abs(shifted.item() - math.log(math.exp(5) + 6)) < 1e-5


class Identity(torch.nn.Module):
    """Stands for a timm backbone in k-NN: the 'images' are already features."""
    num_features = 4

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x


def _two_rank_worker(rank: int, world: int, init_file: str, inputs: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = torch.load(inputs)
    z = data["z"][rank].clone().requires_grad_(True)  # this rank's 2N rows: view 1, then view 2
    loss = info_nce(z, data["t"])
    loss.backward()
    # k-NN: eval loaders give rank r the samples r, r + world, ... (a bank of 7: ranks hold 4 and 3 rows)
    bank = [(data["bank"][rank::world], data["bank_labels"][rank::world])]
    queries = {"q": [(data["queries"][rank::world], data["query_labels"][rank::world])]}
    figures = knn.evaluate(Identity(), bank, queries, num_classes=3, k=3, temperature=0.07,
                           autocast=contextlib.nullcontext)
    torch.save({"loss": loss.detach(), "grad": z.grad, "knn": figures}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_info_nce_and_knn_across_two_gloo_ranks(tmp_path):
    """Each rank's loss is the mean over its own anchors of the single-process loss on the global batch, and the
    gradient reaching each rank's embeddings is that of the sum of all ranks' losses (the gather passes
    gradients back). k-NN with the bank split over the ranks gives the single-process figure."""
    world, n, t = 2, 3, 0.2
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(world, 2 * n, 8, generator=generator)
    bank, queries = torch.randn(7, 4, generator=generator), torch.randn(5, 4, generator=generator)
    data = {"z": z, "t": t, "bank": torch.nn.functional.normalize(bank, dim=1),
            "bank_labels": torch.randint(0, 3, (7,), generator=generator),
            "queries": torch.nn.functional.normalize(queries, dim=1),
            "query_labels": torch.randint(0, 3, (5,), generator=generator)}
    torch.save(data, tmp_path / "inputs.pt")
    mp.spawn(_two_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "inputs.pt"), str(tmp_path)),
             nprocs=world, join=True)

    # The global batch, laid out as info_nce expects: every rank's view 1, then every rank's view 2.
    global_z = torch.cat([z[:, :n].reshape(-1, 8), z[:, n:].reshape(-1, 8)]).requires_grad_(True)
    per_anchor = info_nce(global_z, t, gather=False, reduction="none")
    total = 0
    for rank in range(world):
        anchors = list(range(rank * n, (rank + 1) * n)) + list(range((world + rank) * n, (world + rank + 1) * n))
        expected = per_anchor[anchors].mean()
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], expected, rtol=1e-5), (rank, got["loss"], expected)
        total = total + expected
    total.backward()
    for rank in range(world):
        anchors = list(range(rank * n, (rank + 1) * n)) + list(range((world + rank) * n, (world + rank + 1) * n))
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["grad"].abs().sum() > 0
        assert torch.allclose(got["grad"], global_z.grad[anchors], rtol=1e-4, atol=1e-7), rank

    single = knn.evaluate(Identity(), [(data["bank"], data["bank_labels"])],
                          {"q": [(data["queries"], data["query_labels"])]}, num_classes=3, k=3, temperature=0.07,
                          autocast=contextlib.nullcontext)
    for rank in range(world):
        assert torch.load(tmp_path / f"rank{rank}.pt")["knn"] == single


def test_knn_votes_are_weighted_by_similarity():
    """Wu et al.'s weighted vote against a loop: 3 neighbours, two of class 0 far away, one of class 1 close."""
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.2, 1.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.5]]), dim=1)
    similarity = (query @ bank.T)[0]
    top = similarity.topk(3).indices.tolist()
    for temperature in (0.07, 1.0, 100.0):
        votes = [sum(float(torch.exp(similarity[i] / temperature)) for i in top if labels[i] == c) for c in range(3)]
        expected = max(range(3), key=votes.__getitem__)
        assert knn.predict(bank, labels, query, num_classes=3, k=3, temperature=temperature).item() == expected
    # A sharp temperature follows the nearest neighbour; a flat one counts heads (two of class 0).
    assert knn.predict(bank, labels, query, num_classes=3, k=3, temperature=0.07).item() == 1
    assert knn.predict(bank, labels, query, num_classes=3, k=3, temperature=100.0).item() == 0


# --- rotation --------------------------------------------------------------------------------------------------

def test_rotation_labels_match_torch_rot90():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).view(3, 5, 5)  # no rotation maps it onto another
    turns = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    assert all(not torch.equal(turns[a], turns[b]) for a in range(4) for b in range(a))
    images = image.expand(16, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    rotated, labels = rotate(images)
    assert rotated.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    for b in range(16):
        assert [k for k in range(4) if torch.equal(rotated[b], turns[k])] == [int(labels[b])]
    assert torch.bincount(labels, minlength=4).tolist() == [4, 4, 4, 4]  # every label, balanced
    with pytest.raises(ValueError, match="square"):
        rotate(torch.zeros(4, 3, 8, 6))


# --- pre-training and transfer on the sample -------------------------------------------------------------------

def test_simclr_pretraining_beats_random_init_in_knn(pretrained, ssl_data):
    """Observed: random init 45/80 correct (56 %), after 36 SimCLR steps 61/80 (76 %). The random ViT is no
    strawman here: a class differs in hue, and random patch embeddings keep colour. 10 points (8 images)
    leave room for other machines' float rounding and still fail a pre-training that learns nothing."""
    saved = checkpoint.load(pretrained / "checkpoints" / "last.pt")
    config = config_from_dict(saved["config"])
    torch.manual_seed(config.train.seed)  # the run's own initial weights
    network = build_network(config, build_objective(config), 8)
    random_correct, samples, _ = knn_correct(backbone_of(network), ssl_data)
    network.backbone.load_state_dict(saved["model"])
    trained_correct, _, figures = knn_correct(backbone_of(network), ssl_data)
    assert samples == 80
    assert trained_correct >= random_correct + 8, (trained_correct, random_correct)

    # What the run wrote: its k-NN after the last epoch is this same figure, best.pt is chosen by it.
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["final"]["holdout"]["knn_top1"] == figures["holdout"]["knn_top1"]
    assert summary["best"]["knn_top1"] == figures["holdout"]["knn_top1"] and summary["best"]["epoch"] == 4
    evals = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in evals if r["kind"] == "eval" and "knn_top1" in r} == {"holdout", "val"}


def test_ssl_checkpoints_keep_timm_names(pretrained):
    """The backbone loads into timm strictly (num_classes=0: no classifier); the projector is kept apart."""
    import timm
    for name in ("last.pt", "best.pt"):
        saved = torch.load(pretrained / "checkpoints" / name, weights_only=True)
        model_config = saved["config"]["model"]
        model = timm.create_model(model_config["name"], num_classes=saved["num_classes"], **model_config["kwargs"])
        model.load_state_dict(saved["model"])
        assert saved["num_classes"] == 0 and {k.split(".")[0] for k in saved["objective_head"]} == {"0", "1", "3"}


def test_a_linear_probe_on_the_pretrained_model_beats_one_on_random_init(pretrained, ssl_data, tmp_path):
    """The same probe (5 epochs, lr 1e-2, 45 steps) on both backbones. Observed: pretrained 60/80 correct
    (holdout + val), random init 42/80. 10 points (8 images) of margin, as above."""
    budget = ["--finetune", "linear", "--epochs", "5", "--lr", "1e-2", "--set", "train.eval_every=5"]
    assert run(ssl_data, tmp_path / "probe_pre", "--init", str(pretrained), *budget) == 0
    assert run(ssl_data, tmp_path / "probe_rand", *budget) == 0

    def correct(run_dir):
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        return sum(round(f["top1"] * f["samples"]) for f in final.values())
    assert correct(tmp_path / "probe_pre") >= correct(tmp_path / "probe_rand") + 8


@pytest.fixture(scope="module")
def sources(pretrained, ssl_data, tmp_path_factory):
    """A checkpoint of each objective: supervised and rotation after 2 steps, simclr the pre-trained one."""
    root = tmp_path_factory.mktemp("sources")
    for objective in ("supervised", "rotation"):
        assert run(ssl_data, root / objective, "--objective", objective, "--epochs", "1",
                   "--set", "train.log_every=1", "--set", "train.stop_at_step=2") == 0
    return {"supervised": root / "supervised" / "checkpoints" / "last.pt",
            "rotation": root / "rotation" / "checkpoints" / "last.pt",
            "simclr": pretrained / "checkpoints" / "last.pt"}


def frozen_by_rule(name: str, mode: str) -> bool:
    if mode == "linear":
        return not name.startswith("head.")
    if mode == "freeze":  # --freeze-blocks 2: the embedding and blocks 0 and 1
        return name in ("cls_token", "pos_embed") or name.startswith(("patch_embed.", "blocks.0.", "blocks.1."))
    return False


@pytest.mark.parametrize("kind", ["supervised", "simclr", "rotation"])
@pytest.mark.parametrize("mode", ["full", "linear", "freeze"])
def test_finetuning_loads_each_kind_and_freezes_what_it_says(sources, ssl_data, tmp_path, capsys, kind, mode):
    """2 optimizer steps from the checkpoint's backbone: the frozen parameters keep their loaded values exactly,
    every other one moves (AdamW's first steps move every weight that has a gradient by about lr)."""
    extra = {"full": [], "linear": ["--finetune", "linear"], "freeze": ["--freeze-blocks", "2"]}[mode]
    run_dir = tmp_path / "ft"
    assert run(ssl_data, run_dir, "--init", str(sources[kind]), "--epochs", "1", "--set", "train.log_every=1",
               "--set", "train.stop_at_step=2", *extra) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"({kind} run)" in err
    if kind != "supervised":
        assert f"dropped its {kind} head" in err and "new classifier: head.weight, head.bias" in err

    # The weights the run started from: the checkpoint's backbone in the run's freshly initialized model.
    source = checkpoint.load(sources[kind])["model"]
    config = load_config("tiny_cpu")
    torch.manual_seed(config.train.seed)
    start = build_network(config, build_objective(config), 8).state_dict()
    start.update({k: v for k, v in source.items() if k in start and v.shape == start[k].shape})
    end = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]
    assert end.keys() == start.keys()
    frozen = {k for k in end if frozen_by_rule(k, mode)}
    assert all(torch.equal(end[k], start[k]) for k in frozen)
    moved = [k for k in end if k not in frozen and not torch.equal(end[k], start[k])]
    assert sorted(moved) == sorted(k for k in end if k not in frozen)
    assert (mode != "full") == bool(frozen)


def test_the_optimizer_gets_only_trainable_parameters():
    from training.transfer import freeze
    config = load_config("tiny_cpu", ["model.freeze_blocks=3"])
    model = build_network(config, build_objective(config), 8)
    freeze(model, config)
    in_optimizer = {id(p) for group in build_optimizer(model, config.optim).param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.blocks[2].attn.qkv.weight.requires_grad and model.blocks[3].attn.qkv.weight.requires_grad


def test_a_linear_probe_keeps_the_backbone_in_eval_mode():
    """train_epoch puts the model in train mode, then the frozen modules back in eval mode: with dropout in the
    backbone (drop_rate 0.5), its features stay deterministic while the head trains."""
    from training.loop import Step, TrainState, train_epoch
    from training.optim import build_scheduler
    from training.transfer import freeze
    config = load_config("tiny_cpu", ["model.finetune=linear",
                                      "model.kwargs={img_size: 32, patch_size: 4, depth: 4, drop_rate: 0.5}"])
    torch.manual_seed(0)
    model = build_network(config, build_objective(config), 8)
    frozen = freeze(model, config)
    optimizer = build_optimizer(model, config.optim)
    class Batches(list):  # two fixed batches behind the loader contract's set_epoch (train_epoch seeks)
        def set_epoch(self, epoch, start_batch=0):
            assert start_batch == 0

    batches = Batches((torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4,))) for _ in range(2))
    step = Step(model, optimizer, build_scheduler(optimizer, config.optim, steps_per_epoch=2, epochs=1),
                torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext, 0.0, build_objective(config),
                tuple(frozen))
    assert train_epoch(step, batches, TrainState(), world_size=1, log_every=1, log=lambda r: None,
                       progress=lambda b: None, window_end=lambda: False)
    assert model.head.training and not any(m.training for m in model.blocks.modules())
    x = batches[0][0]
    assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                       model.forward_head(model.forward_features(x), pre_logits=True))


def test_a_head_of_another_shape_is_replaced_with_a_message(sources, ssl_data, tmp_path, capsys):
    saved = checkpoint.load(sources["supervised"])
    saved["model"]["head.weight"] = saved["model"]["head.weight"][:5]
    saved["model"]["head.bias"] = saved["model"]["head.bias"][:5]
    torch.save(saved, tmp_path / "five_classes.pt")
    assert run(ssl_data, tmp_path / "ft", "--init", str(tmp_path / "five_classes.pt"), "--epochs", "1",
               "--set", "train.log_every=1", "--set", "train.stop_at_step=1") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("dropped the checkpoint's classifier head.weight [5, 192], head.bias [5]: it does not fit this "
            "model's (head.weight [8, 192], head.bias [8])") in err


def test_ssl_runs_resume(ssl_data, tmp_path):
    """A rotation run stopped mid-epoch resumes and finishes with a k-NN evaluation."""
    run_dir = tmp_path / "rot"
    assert run(ssl_data, run_dir, "--objective", "rotation", "--epochs", "1", "--set", "train.log_every=1",
               "--set", "train.stop_at_step=3") == 0
    assert main(["--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 288 // 32
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert saved["objective_head"]["weight"].shape == (4, 192)
    assert not any(k.startswith("head.") for k in saved["model"])
    # the resumed run's k-NN figure is the one its final weights score
    config = config_from_dict(saved["config"])
    network = build_network(config, build_objective(config), 8)
    network.backbone.load_state_dict(saved["model"])
    assert summary["final"]["holdout"]["knn_top1"] == knn_correct(backbone_of(network), ssl_data)[2]["holdout"]["knn_top1"]


@pytest.mark.parametrize("extra,message", [
    (["--init", "MISSING"], "no checkpoint at"),
    (["--init", "NOT_A_CHECKPOINT"], "not a checkpoint"),
    (["--freeze-blocks", "5"], "model.freeze_blocks=5, but vit_tiny_patch16_224 has 4 blocks"),
    (["--freeze-blocks", "-1"], "model.freeze_blocks=-1"),
    (["--objective", "simclrr"], "train.objective: 'simclrr' is not one of supervised, simclr, rotation"),
    (["--finetune", "partial"], "model.finetune: 'partial' is not one of full, linear"),
    (["--objective", "simclr", "--finetune", "linear"], "apply to the supervised objective"),
    (["--finetune", "linear", "--freeze-blocks", "2"], "has no effect with model.finetune=linear"),
    (["--set", "ssl.temperature=hot"], "ssl.temperature: expected float"),
])
def test_bad_transfer_or_objective_is_an_error_that_names_it(ssl_data, tmp_path, capsys, extra, message):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    extra = [{"MISSING": str(tmp_path / "nope.pt"), "NOT_A_CHECKPOINT": str(tmp_path / "notes.txt")}.get(a, a)
             for a in extra]
    assert run(ssl_data, tmp_path / "bad", *extra) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "bad").exists()  # refused before the run directory is made


def test_an_init_from_another_architecture_is_an_error(sources, ssl_data, tmp_path, capsys):
    assert run(ssl_data, tmp_path / "bad", "--init", str(sources["rotation"]),
               "--set", "model.kwargs={img_size: 32, patch_size: 4, depth: 2}") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "does not fit this model (unexpected: blocks.2." in err and "depth': 4" in err



def test_two_process_gloo_simclr_run(ssl_data, tmp_path):
    """torchrun, 2 CPU processes: SimCLR trains with negatives gathered across the ranks, and k-NN gathers the
    bank (288 train images, 144 per rank) and counts every holdout image once."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
           str(ROOT / "training/run.py"), "--preset", "tiny_cpu_simclr", "--data", str(ssl_data), *LOADER,
           "--epochs", "1", "--out", str(tmp_path), "--name", "ddp"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 288 // 2 // 32
    assert summary["final"]["holdout"]["bank"] == 288 and summary["final"]["holdout"]["samples"] == 32
    # 4 steps, log_every 5: one train record, at the last step; its loss finite and below chance: log(127) for an
    # anchor with 1 positive among the 127 other views of 2 ranks x 32 images (two views of one image start out
    # more alike than two of different images)
    train = [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert [s for s, _ in train] == [summary["steps"]] and all(0 < loss < math.log(127) for _, loss in train), train
