"""Evaluation eager against compiled: images/s of the trainer's evaluation (training/loop.py, evaluate) through the
plain model and through its compiled twin (model.compile_eval, training/model.py: compile_for_evaluation), what
the compile costs, and what each projects to per ImageNet epoch, with the EMA's second pass.

    python -m benchmarks.evaluation [--preset vit_b16_seed] [--batch-size N] [--batches 20] [--repeats 3]
                                    [--device cpu|cuda] [--precision fp32|bf16|fp16] [--compile-mode default|...]

Input: synthetic normalized batches made once on the device (pipelines/loaders/synthetic.py), `--batches` full
ones and a smaller last one, as a split's evaluation ends, so that the compiled twin builds both of its graphs.
- The compiled twin's first pass, its compile included, is timed apart (`first_pass_s`); the plain model's first
  pass is a warm-up outside the clock.
- Then `--repeats` rounds, each one timed pass of each, the order reversed every other round (ABBA). A pass ends
  with evaluate's own read-back of its counters, so the device's work is inside the clock.
- compile_s = first_pass_s - the compiled twin's median pass.
Projection per ImageNet epoch: the holdout (HOLDOUT_IMAGES) and the official validation set (VAL_IMAGES) at each
rate, and twice that with an EMA (its weights are evaluated after the raw ones: the same pass again);
`break_even_epochs` = compile_s / the seconds compiling saves per epoch (with the EMA: twice the compile, twice
the saving). Writes benchmarks/results/evaluation-<stamp>.json and .md (or into --results).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks import record
from benchmarks.loaders import IMAGENET_TRAIN_IMAGES, sync
from benchmarks.record import record_path, summarize, write_record
from pipelines.loaders.synthetic import SyntheticLoader
from training.config import COMPILE_MODES, apply_overrides, load_config
from training.loop import evaluate
from training.model import compile_for_evaluation
from training.objectives import build_network, build_objective
from training.precision import DTYPES, autocast_factory

IMAGENET_TRAIN_SOURCE_IMAGES = 1_281_167
HOLDOUT_IMAGES = IMAGENET_TRAIN_SOURCE_IMAGES - IMAGENET_TRAIN_IMAGES  # the converter's 10 % holdout
VAL_IMAGES = 50_000  # ILSVRC2012's validation set
EAGER = "eager"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b16_seed", help="a supervised preset (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's on a GPU, 8 on a CPU")
    p.add_argument("--batches", type=int, default=None,
                   help="full batches per pass, then one smaller (default: 40 on a GPU, 4 on a CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each (default: %(default)s)")
    p.add_argument("--precision", choices=list(DTYPES), default=None,
                   help="default: the preset's on a GPU, fp32 on a CPU (bf16 autocast is emulated there)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="the compiled twin's torch.compile mode (default: the preset's model.compile_mode)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile's backend (inductor is what training uses; 'eager' checks the plumbing fast)")
    p.add_argument("--num-classes", type=int, default=1000, help="the classifier's classes (ImageNet-1k's)")
    p.add_argument("--results", type=Path, default=record.RESULTS)
    args = p.parse_args(argv)
    cpu = torch.device(args.device).type == "cpu"
    args.batches = args.batches or (4 if cpu else 40)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be at least 1")
    return args


def passes(args, device: torch.device, console: Console):
    """(config, {variant: one timed pass}, first pass of the compiled twin in seconds)."""
    config = apply_overrides(load_config(args.preset), args.set)
    precision = args.precision or (config.train.precision if device.type == "cuda" else "fp32")
    model_config = dataclasses.replace(config.model, compile=True, compile_eval=True,
                                       compile_mode=args.compile_mode or config.model.compile_mode)
    config = dataclasses.replace(config, model=model_config,
                                 train=dataclasses.replace(config.train, precision=precision))
    objective = build_objective(config, args.num_classes)
    if not objective.supervised:
        raise SystemExit(f"--preset {args.preset}: a self-supervised preset is evaluated by k-NN, uncompiled")
    torch.manual_seed(0)
    model = build_network(config, objective, args.num_classes).to(device).to(memory_format=torch.channels_last)
    batch_size = args.batch_size or (8 if device.type == "cpu" else config.data.batch_size)
    images, labels = next(iter(SyntheticLoader(batches=1, batch_size=batch_size, image_size=config.data.image_size,
                                               num_classes=args.num_classes, device=device,
                                               dtype=DTYPES[precision], seed=0, train=False)))
    last = max(1, batch_size // 3)
    batches = [(images, labels)] * args.batches + [(images[:last], labels[:last])]
    autocast = autocast_factory(precision, device)
    networks = {EAGER: model, "compiled": compile_for_evaluation(model, model_config, backend=args.backend)}

    def one_pass(variant: str) -> float:
        sync(device)
        start = time.perf_counter()
        evaluate(networks[variant], batches, num_classes=args.num_classes, autocast=autocast)
        sync(device)
        return time.perf_counter() - start
    console.print(f"[dim]{config.model.name}, batch {batch_size} x {args.batches} + {last}, {precision}, compile "
                  f"{model_config.compile_mode} ({args.backend})[/dim]")
    one_pass(EAGER)  # warm-up: allocations, kernels chosen
    first = one_pass("compiled")  # the compile of both graphs, timed
    return config, one_pass, first, batch_size * args.batches + last


def projection(rates: dict[str, float], compile_s: float) -> dict:
    """Seconds per ImageNet epoch of evaluation at each rate, raw and with an EMA, and when compiling pays."""
    images = HOLDOUT_IMAGES + VAL_IMAGES
    per_epoch = {variant: images / rate for variant, rate in rates.items()}
    saved = per_epoch[EAGER] - per_epoch["compiled"]
    return {"images_per_epoch": images, "eval_s_per_epoch": per_epoch,
            "eval_s_per_epoch_with_ema": {v: 2 * s for v, s in per_epoch.items()},
            "saved_s_per_epoch": saved, "break_even_epochs": compile_s / saved if saved > 0 else None}


def markdown(path: Path, rows: list[dict], runs: dict, settings: dict, env: dict) -> None:
    lines = [f"Evaluation images/s, eager against compiled ({settings['device']}, {settings['precision']}, synthetic "
             f"input), median of {settings['repeats']} passes of {settings['images_per_pass']} images.",
             f"Hardware: {env['cpu']} ({env['cores']} cores){', ' + env['gpu'] if env['gpu'] else ''}. "
             f"Commit {env['commit']}.", "",
             "| model | images/s | min-max | first pass s | compile s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        spread = r["images_per_s"]
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        first = f"{r['first_pass_s']:.1f}" if r.get("first_pass_s") is not None else "-"
        lines.append(f"| {r['variant']} | {spread['median']:,.1f} | {spread['min']:,.1f}-{spread['max']:,.1f} | "
                     f"{first} | {compile_s} |")
    per_epoch = runs["eval_s_per_epoch"]
    lines += ["", f"Per ImageNet epoch ({runs['images_per_epoch']:,} holdout and val images): eager "
              f"{per_epoch[EAGER]:,.0f} s, compiled {per_epoch['compiled']:,.0f} s; with an EMA twice that. "
              + (f"Compiling pays for itself after {runs['break_even_epochs']:.1f} epochs."
                 if runs["break_even_epochs"] is not None else "Compiling saves nothing here.")]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console, device = Console(), torch.device(args.device)
    config, one_pass, first, images = passes(args, device, console)
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "config": config.to_dict(), "precision": config.train.precision, "device": str(device),
                "compile_mode": config.model.compile_mode, "images_per_pass": images}
    times = {EAGER: [], "compiled": []}
    for round_ in range(args.repeats):
        for variant in (times if round_ % 2 == 0 else reversed(list(times))):  # ABBA
            times[variant].append(one_pass(variant))
    rates = {variant: statistics.median(images / s for s in seconds) for variant, seconds in times.items()}
    compile_s = first - statistics.median(times["compiled"])
    rows = [{"variant": variant, "images_per_s": summarize([images / s for s in seconds]),
             "pass_s": summarize(seconds), **({"first_pass_s": first, "compile_s": compile_s}
                                             if variant == "compiled" else {})}
            for variant, seconds in times.items()]
    runs = projection(rates, compile_s)
    path = write_record("evaluation", {"settings": settings, "results": rows, "projection": runs,
                                       "holdout_images": HOLDOUT_IMAGES, "val_images": VAL_IMAGES},
                        directory=args.results)
    markdown(path, rows, runs, settings, record.environment())
    console.print(path.with_suffix(".md").read_text())
    console.print(f"record: {path} (and .md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
