"""Progressive resolution: training images/s of the trainer's own step at each size of a preset's resolution ramp,
and the wall-clock of one full ImageNet run that those rates project to, against presets without a ramp.

    python -m benchmarks.resolution [--preset vit_b16_fast] [--compare vit_b16_seed] [--batch-size N]
                                    [--steps 1] [--repeats 3] [--warmup 1] [--device cpu|cuda]
                                    [--precision fp32|bf16|fp16] [--compile-mode none|default|...]

Each preset gets its own network (training.objectives.build_network: with data.ramp, timm's dynamic_img_size,
one model at every size) and the trainer's Step (training/loop.py; train_step as benchmarks/train_step.py runs
it, plus the EMA update where the preset has train.ema_decay). Its input is synthetic: one batch per size made
once on the device (pipelines/loaders/synthetic.py's SyntheticLoader), so the figure is the model's, not a loader's.
Measured at every distinct size of the ramp (Ramp.distinct_sizes: the final size, data.image_size, among them):
- `--warmup` steps per (preset, size) outside the clock: the first step allocates AdamW's moments and, compiled,
  builds the size's graph (compile_for_training with the ramp's sizes, as training/run.py does);
- then `--repeats` rounds; each round times one window of `--steps` steps of every (preset, size), the device
  synchronized at each window's edges, the order reversed every other round (ABBA) so that the drift of a shared
  machine hits every size alike. The figure is the median window.
The projection: the train epochs of one run on ImageNet, each at its size (Ramp.sizes(train.epochs)), every epoch
IMAGENET_TRAIN_IMAGES / images_per_s(size) seconds: steps only (evaluation, epoch boundaries and the input are
left out: the project's loaders keep up, benchmarks/train_step.py measures that). fast / seed is the share of the
seed's wall-clock a ramped run takes.

On a CPU the defaults are small (batch 8, one-step windows, fp32: bf16 autocast is emulated on CPUs without
bf16 instructions, 15x slower than fp32 on the development machine's AMD EPYC; eager: compiling ViT-B/16 at
4 sizes takes longer than measuring it; about 2.5 minutes for vit_b16_fast beside vit_b16_seed on 2 quiet cores,
twice that on busy ones): they rank the sizes, they do not predict a GPU, where small sizes are
further from saturating the chip. Writes benchmarks/results/resolution-<stamp>.json and .md (or into --results),
rewritten after every round, so that a time limit keeps the rounds measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

from benchmarks import record
from benchmarks.loaders import IMAGENET_TRAIN_IMAGES, sync
from benchmarks.record import record_path, summarize, write_record
from benchmarks.report import projection_table, resolution_table
from benchmarks.train_step import EAGER, build_step, default_peak, with_options
from pipelines.loaders.synthetic import SyntheticLoader
from training.config import COMPILE_MODES, apply_overrides, load_config, ramp_of
from training.loop import train_step
from training.objectives import build_network, build_objective
from training.precision import DTYPES, autocast_factory
from training.model import compile_for_training

# ImageNet-1k's 1,281,167 train images less the converter's 10 % holdout, which takes round(0.1 x n) of each
# class (pipelines/convert/split.py, holdout_count): 1,281,167 x 0.9 = 1,153,050.3, the per-class rounding
# moving the exact count by at most 500 (0.04 %). benchmarks/loaders.py's constant, shared.
IMAGES_SOURCE = ("ImageNet-1k's 1,281,167 train images less the 10 % holdout (round(0.1 x n) per class, "
                 "pipelines/convert/split.py): 1,281,167 x 0.9 = 1,153,050.3; approximate to the per-class "
                 "rounding, at most 500 images (0.04 %)")
CPU_NOTE = ("CPU figures rank the sizes; they do not predict a GPU: on a CPU the step's cost follows its FLOPs, "
            "while on a GPU the small sizes are further from saturating the chip (fewer tokens per matmul), so a "
            "GPU's gain from the ramp is smaller than a CPU's")


def epoch_sizes(config) -> list[int]:
    """The train size of every epoch of a run of this config: the ramp's, or data.image_size throughout."""
    ramp = ramp_of(config)
    return ramp.sizes(config.train.epochs) if ramp else [config.data.image_size] * config.train.epochs


def measured_sizes(config) -> list[int]:
    """The sizes a run trains at, smallest first: the ramp's distinct sizes (its final one is data.image_size)."""
    ramp = ramp_of(config)
    return sorted({*(ramp.distinct_sizes() if ramp else []), config.data.image_size})


def project(sizes: list[int], rates: dict[int, float], images: int = IMAGENET_TRAIN_IMAGES) -> dict:
    """One run's training wall-clock: every epoch `images` / rates[its size] seconds."""
    per_size = {size: count * images / rates[size] for size, count in sorted(Counter(sizes).items())}
    total = sum(per_size.values())
    return {"epochs": len(sizes), "epochs_at": {str(s): c for s, c in sorted(Counter(sizes).items())},
            "images_per_epoch": images, "seconds_at": {str(s): v for s, v in per_size.items()},
            "train_s": total, "train_h": total / 3600}


def flops_per_image(config, objective, num_classes: int, sizes: list[int]) -> dict[int, float]:
    """Training FLOPs (forward and backward) of one image at each size, as torch's FlopCounterMode counts them, on
    the meta device: the count needs shapes only, so it costs no step (~1 s per size for ViT-B/16)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_network(config, objective, num_classes)
    out = {}
    for size in sizes:
        images = torch.randn(2, 3, size, size, device="meta").contiguous(memory_format=torch.channels_last)
        counter = FlopCounterMode(display=False)
        with counter:
            model(images).float().sum().backward()
        out[size] = counter.get_total_flops() / 2
    return out


def patch_side(model: torch.nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if isinstance(patch, (tuple, list)) else patch


@dataclasses.dataclass
class Subject:
    """One preset under test: its config, its step and a batch per size."""
    preset: str
    config: object
    one_step: object  # (size) -> None: train_step on that size's batch, then the EMA update where the preset has one
    batches: dict
    patch: int | None
    flops: dict


def build_subject(preset: str, args, device: torch.device, console: Console) -> Subject:
    config = apply_overrides(load_config(preset), args.set)
    precision = args.precision or (config.train.precision if device.type == "cuda" else "fp32")
    mode = args.compile_mode or ((config.model.compile_mode if config.model.compile else EAGER)
                                 if device.type == "cuda" else EAGER)
    config = with_options(config, mode, config.optim.fused)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    sizes = measured_sizes(config)
    objective = build_objective(config, args.num_classes)
    torch.manual_seed(0)
    model = build_network(config, objective, args.num_classes).to(device).to(memory_format=torch.channels_last)
    trained = compile_for_training(model, config.model, sizes=len(sizes))
    autocast = autocast_factory(precision, device)
    step = build_step(model, trained, config, objective, autocast, device)
    ema = None
    if config.train.ema_decay:  # training/run.py updates it after every step (training/loop.py, train_epoch)
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=config.train.ema_decay, use_warmup=config.train.ema_warmup)
    batch_size = args.batch_size or config.data.batch_size
    batches = {}
    for size in sizes:  # made once, on the device, as the synthetic loader makes them
        loader = SyntheticLoader(batches=1, batch_size=batch_size, image_size=size, num_classes=args.num_classes,
                                 device=device, dtype=DTYPES[precision], seed=0, train=True)
        batches[size] = next(iter(loader))
    counter = [0]

    def one_step(size: int) -> None:
        train_step(step, *batches[size])
        counter[0] += 1
        if ema is not None:
            ema.update(model, step=counter[0])
    console.print(f"[dim]{preset}: {config.model.name}, sizes {sizes}, batch {batch_size}, {precision}, "
                  f"compile {mode}[/dim]")
    return Subject(preset, config, one_step, batches, patch_side(model),
                   flops_per_image(config, objective, args.num_classes, sizes))


def window(subject: Subject, size: int, steps: int, device: torch.device) -> float:
    """Seconds of `steps` steps at `size`, the device synchronized at both edges."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        subject.one_step(size)
    sync(device)
    return time.perf_counter() - start


def rows_of(subjects: list[Subject], times: dict, warmups: dict, args, peak: float | None) -> list[dict]:
    rows = []
    for subject in subjects:
        batch = args.batch_size or subject.config.data.batch_size
        final = subject.config.data.image_size
        for size in subject.batches:
            seconds = times[subject.preset, size]
            if not seconds:
                continue
            rates = [batch * args.steps / s for s in seconds]
            rate, flops = statistics.median(rates), subject.flops[size]
            rows.append({"preset": subject.preset, "size": size, "batch_size": batch,
                         "tokens": (size // subject.patch) ** 2 if subject.patch else None,
                         "final_size": final, "images_per_s": summarize(rates),
                         "step_ms": summarize([1e3 * s / args.steps for s in seconds]),
                         "train_gflops_per_image": flops / 1e9, "achieved_tflops": rate * flops / 1e12,
                         "mfu": rate * flops / (peak * 1e12) if peak else None,
                         "warmup_s": warmups[subject.preset, size]})
    finals = {r["preset"]: r["images_per_s"]["median"] for r in rows if r["size"] == r["final_size"]}
    for r in rows:
        if r["preset"] in finals:
            r["vs_final_size"] = r["images_per_s"]["median"] / finals[r["preset"]]
    return rows


def projections(subjects: list[Subject], rows: list[dict]) -> list[dict]:
    """Each preset's projected run, from its own model's rates; `vs` is its train_s over each other preset's."""
    out = []
    for subject in subjects:
        rates = {r["size"]: r["images_per_s"]["median"] for r in rows if r["preset"] == subject.preset}
        sizes = epoch_sizes(subject.config)
        if set(sizes) <= set(rates):
            out.append({"preset": subject.preset, **project(sizes, rates)})
    for p in out:
        p["vs"] = {q["preset"]: p["train_s"] / q["train_s"] for q in out if q is not p}
    return out


def markdown(path: Path, rows: list[dict], runs: list[dict], settings: dict, env: dict, note: str | None) -> None:
    lines = [f"Training images/s of the trainer's step at each size of a resolution ramp ({settings['device']}, "
             f"synthetic input made once on the device), median of {settings['repeats']} windows of "
             f"{settings['steps']} step(s), the sizes interleaved in every round.",
             f"Hardware: {env['cpu']} ({env['cores']} cores){', ' + env['gpu'] if env['gpu'] else ''}. "
             f"Commit {env['commit']}.", "", *resolution_table(rows), "", *projection_table(runs), "",
             f"ImageNet train images per epoch: {IMAGENET_TRAIN_IMAGES:,} ({IMAGES_SOURCE}). Steps only: "
             "evaluation and epoch boundaries are left out."]
    if note:
        lines += ["", f"Note: {note}."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b16_fast", help="the preset with a ramp (default: %(default)s)")
    p.add_argument("--compare", nargs="*", default=[], metavar="PRESET",
                   help="presets measured beside it, in the same rounds (e.g. vit_b16_seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the preset's on a GPU, 8 on a CPU (ViT-B/16 at 224 px: seconds per step)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default: 10 on a GPU, 1 on a CPU)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, each one window per size (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps per size before the clock (default: 5 on a GPU, which holds a compile; 1 on a CPU)")
    p.add_argument("--precision", choices=list(DTYPES), default=None,
                   help="default: the preset's on a GPU, fp32 on a CPU (bf16 autocast is emulated there)")
    p.add_argument("--compile-mode", choices=[EAGER, *COMPILE_MODES], default=None,
                   help="torch.compile's mode, 'none' for eager (default: the preset's on a GPU, none on a CPU)")
    p.add_argument("--num-classes", type=int, default=1000, help="the classifier's classes (ImageNet-1k's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: the GPU's dense bf16 peak)")
    p.add_argument("--results", type=Path, default=record.RESULTS)
    args = p.parse_args(argv)
    cpu = torch.device(args.device).type == "cpu"
    if args.batch_size is None and cpu:
        args.batch_size = 8
    args.steps = args.steps or (1 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        p.error("--steps, --repeats and --warmup must be at least 1 (the first step allocates AdamW's state)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console, device = Console(), torch.device(args.device)
    presets = list(dict.fromkeys([args.preset, *args.compare]))
    subjects = [build_subject(preset, args, device, console) for preset in presets]
    precision = {s.preset: s.config.train.precision for s in subjects}
    peak = args.peak_tflops or default_peak(device, precision[args.preset])
    note = CPU_NOTE if device.type == "cpu" else None
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "presets": presets,
                "configs": {s.preset: s.config.to_dict() for s in subjects}, "precision": precision,
                "compile_mode": {s.preset: s.config.model.compile_mode if s.config.model.compile else EAGER
                                 for s in subjects},
                "peak_tflops": peak, "device": str(device)}
    configs = [(s, size) for s in subjects for size in s.batches]
    times = {(s.preset, size): [] for s, size in configs}
    warmups = {}
    path = record_path("resolution", args.results)

    def save() -> tuple[list[dict], list[dict]]:  # after every round: a time limit keeps the rounds measured
        rows = rows_of(subjects, times, warmups, args, peak)
        for r in rows:
            r["precision"] = precision[r["preset"]]
        runs = projections(subjects, rows)
        write_record("resolution", {"settings": settings, "note": note, "imagenet_train_images": IMAGENET_TRAIN_IMAGES,
                                    "imagenet_train_images_source": IMAGES_SOURCE, "results": rows,
                                    "projection": runs}, path=path)
        markdown(path, rows, runs, settings, record.environment(), note)
        return rows, runs

    for subject, size in configs:
        console.print(f"[dim]warm-up: {subject.preset} at {size} px ...[/dim]")
        warmups[subject.preset, size] = window(subject, size, args.warmup, device)
    for round_ in range(args.repeats):
        for subject, size in (configs if round_ % 2 == 0 else configs[::-1]):  # ABBA: drift hits every size alike
            times[subject.preset, size].append(window(subject, size, args.steps, device))
        rows, runs = save()
        console.print(f"[dim]round {round_ + 1} of {args.repeats}: "
                      + ", ".join(f"{r['preset']} {r['size']} px {r['images_per_s']['repeats'][-1]:,.2f}/s"
                                  for r in rows)
                      + "[/dim]")
    console.print("\n".join(resolution_table(rows)))
    console.print("\n".join(projection_table(runs)))
    if note:
        console.print(f"note: {note}")
    console.print(f"record: {path} (and .md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
