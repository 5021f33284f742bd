"""The benchmark suites, one entry point: builds the data they need, then runs each part and writes its records.

    python -m benchmarks.run --suite cpu|gpu|all [--only data loaders scaling train simclr mae colorize resolution
                                                          convert]
                             [--dry-run]
                             [--results benchmarks/results] [--work build/bench]
    python -m benchmarks.report          # then: benchmarks/report.md with tables and charts

Parts (each writes JSON records with hardware, versions, commit and settings; see benchmarks/record.py):
- `data`: a generated ImageNet-like sample (tools/make_sample_imagenet.py), converted at every stored
  resolution the suite measures (the converter's --max-resolution; 0 keeps full size). Reused when present.
- `loaders`: each loader alone (benchmarks/loaders.py) at every stored resolution, all cores, and on the data
  the training part reads, RandAugment (DeiT's rand-m9-mstd0.5-inc1) on against off, side by side; then with
  the two-view (SimCLR) augmentation, where images/s counts views.
- `scaling`: the loaders over a sweep of CPU workers at one resolution, to show where each one saturates.
- `train`: training steps from synthetic input and from each loader (benchmarks/train_step.py): the
  real/synthetic ratio, MFU and peak GPU memory, with a profile that splits each step into input wait and
  model time.
- `simclr`: the same for SimCLR (two views per image), at the supervised run's batch, without a profile.
- `mae`, `colorize`: the same for the masked autoencoder and for colorization, each with its own preset (its
  network: MAE's decoder, colorization's per-patch head) at the supervised run's data, batch and windows, without
  a profile; the report sets MAE's synthetic-input rate beside each loader's rate alone.
- `resolution`: ViT-B/16's training images/s at each size of vit_b16_fast's resolution ramp (128 -> 224 px)
  beside vit_b16_seed at 224 px, and the wall-clock of an ImageNet run each projects to
  (benchmarks/resolution.py); synthetic input, so it needs no data.
- `convert`: converter images/s per core (benchmarks/convert.py).

Train epochs are at least 200 batches at the suite's batch size, so that an epoch start weighs in the
figures about as little as in an ImageNet epoch (18,016 batches of 64), and each loader's epoch boundary and
mid-epoch start are measured apart (benchmarks/loaders.py). The data cost that once, and is reused. A quarter
of the images (a fifth on the GPU) are generated, the rest are hard links to them: the `cpu` suite's data step,
generating 1,800 images and converting 7,200 at 256 px, 512 px and full size, took 90 s on 2 busy cores
(generating all 7,200 had taken 7.2 minutes).
`cpu` runs everything on the CPU with the tiny model; `gpu` runs ViT-B/16 bf16 compiled on the GPU, at ImageNet
size (benchmarks/gpu_check.sh); `all` is both.
`--dry-run` runs the same parts with tiny sizes on the CPU, in seconds: the tests and gpu_check.sh's own
--dry-run use it. A part that fails is reported and the others still run; the exit status is 1 if any failed.
`--deadline-s` skips the parts that would start after that many seconds (the GPU machine's window is short).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
import traceback
from pathlib import Path

from rich.console import Console

from benchmarks import convert as convert_bench
from benchmarks import loaders as loaders_bench
from benchmarks import record
from benchmarks import resolution as resolution_bench
from benchmarks import train_step as train_bench

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's, as training/presets/deit_b16.yaml trains with it
# convert runs before the loaders: it forks worker processes, which is unsafe once DALI and FFCV threads run
PARTS = ("data", "convert", "loaders", "scaling", "train", "simclr", "mae", "colorize", "resolution")
TRAIN_PARTS = ("train", "simclr", "mae", "colorize")  # the parts that train from the suite's data
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    device: str
    # the generated sample: classes x images per class, ImageNet-size JPEGs (3 % of them 1,600-4,000 px)
    classes: int
    per_class: int
    # images generated per class; the rest of per_class are hard links to them under new names. Generating
    # is the data step's cost (7,200 images took 432 s on 2 busy cores); a loader decodes and augments a copy
    # exactly as it does an original, and the converted output fits in the page cache either way.
    unique_per_class: int
    resolutions: tuple[int, ...]  # stored --max-resolution values for `loaders`; 0 is full size
    scaling_resolution: int  # where `scaling` sweeps the workers
    scaling_workers: tuple[int, ...]
    loader_args: tuple[str, ...]  # benchmarks.loaders' window settings
    train_resolution: int  # the stored data `train` reads
    train_args: tuple[str, ...]  # benchmarks.train_step's model and window settings
    # the preset each self-supervised part trains in place of train_args' (the objective's network and recipe),
    # at train_args' batch and windows
    objective_presets: tuple[tuple[str, str], ...]
    resolution_args: tuple[str, ...]  # benchmarks.resolution's presets and window settings
    convert_args: tuple[str, ...]


def worker_sweep(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the cores, the cores included."""
    sweep, n = [], 1
    while n < cores:
        sweep.append(n)
        n *= 2
    return tuple(sweep + [cores])


def suites(cores: int) -> dict[str, Suite]:
    # Train epochs of at least 200 batches at the suite's batch size (the holdout takes 10 %): an ImageNet
    # epoch is 18,016 batches of 64, and in an 8-batch epoch an epoch start of 2-4 batch-times was half the time.
    return {
        # 2 cores: the tiny ViT at 32 px (training/presets/tiny_cpu.yaml); windows of >= 3 s, median of 3.
        # 10 x 720 images: 6,480 train = 202 batches of 32. Batch 32, not 64, for loaders and training: 200
        # batches of 64 would need 14,300 images, converted at three sizes, twice the data time on 2 cores.
        "cpu": Suite("cpu", "cpu", classes=10, per_class=720, unique_per_class=180, resolutions=(256, 512, 0), scaling_resolution=512,
                     scaling_workers=worker_sweep(cores),
                     loader_args=("--batch-size", "32", "--batches", "5", "--window-s", "3", "--repeats", "3",
                                  "--warmup", "3", "--boundaries", "3", "--starts", "3"),
                     train_resolution=512,
                     train_args=("--preset", "tiny_cpu", "--batch-size", "32", "--steps", "10", "--repeats", "3",
                                 "--warmup", "3"),
                     objective_presets=(("mae", "tiny_cpu_mae"), ("colorize", "tiny_cpu_colorize")),
                     # ViT-B/16 itself, eager fp32 (bf16 is emulated on this CPU): a step of batch 8 takes 3-8 s,
                     # so windows of one step, 3 rounds over 5 (preset, size) pairs: 2.5 minutes on quiet cores
                     resolution_args=("--preset", "vit_b16_fast", "--compare", "vit_b16_seed", "--batch-size", "8",
                                      "--steps", "1", "--repeats", "3", "--warmup", "1"),
                     convert_args=("--repeats", "3", "--classes", "10", "--per-class", "30")),
        # One H100 or H200: 100 x 145 full-size images (30 generated per class), 13,100 train = 204 batches of 64. Loaders at full size
        # (the goal's 10,000 images/s is from full-size JPEGs) and at the default 512. A window is >= 1 s while
        # its epoch lasts: 156 batches at 10,000 images/s; at 20,000 the epoch's 202 after the start. ViT-B/16 at
        # the goals' batch of 64 only: 200 batches of 256 would need 57,000 images. The 20 warm-up steps hold
        # the compile.
        "gpu": Suite("gpu", "cuda", classes=100, per_class=145, unique_per_class=30, resolutions=(0, 512), scaling_resolution=0,
                     scaling_workers=worker_sweep(cores),
                     loader_args=("--batch-size", "64", "--batches", "5", "--window-s", "1", "--repeats", "3",
                                  "--warmup", "10", "--boundaries", "2", "--starts", "2"),
                     train_resolution=512,
                     train_args=("--preset", "vit_b16_seed", "--batch-size", "64", "--steps", "30",
                                 "--repeats", "3", "--warmup", "20"),
                     objective_presets=(("mae", "mae_vit_b16"), ("colorize", "colorize_vit_b16")),
                     # bf16, eager: compiled, the 5 (preset, size) graphs would take 3-6 minutes, more than the GPU
                     # check has; eager steps carry more launch overhead at the small sizes, so the ramp's gain
                     # measured here is a lower bound of the compiled one
                     resolution_args=("--preset", "vit_b16_fast", "--compare", "vit_b16_seed", "--batch-size", "64",
                                      "--steps", "10", "--repeats", "3", "--warmup", "3", "--compile-mode", "none"),
                     convert_args=("--repeats", "2", "--classes", "10", "--per-class", "30")),
    }


def dry(suite: Suite) -> Suite:
    """The same parts with tiny sizes on the CPU: plumbing, not figures. 3 x 16 images: 45 train, 5 batches
    of 8, enough for a window, an epoch boundary and starts at 0, 50 and 90 % of the epoch."""
    return dataclasses.replace(
        suite, device="cpu", classes=3, per_class=16, unique_per_class=8, scaling_workers=(1, 2),
        loader_args=("--batch-size", "8", "--image-size", "32", "--batches", "2", "--repeats", "2", "--warmup", "1",
                     "--boundaries", "2", "--starts", "2"),
        train_args=("--preset", "tiny_cpu", "--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1"),
        objective_presets=(("mae", "tiny_cpu_mae"), ("colorize", "tiny_cpu_colorize")),
        # the tiny ViT with a 24 -> 32 px ramp beside it without one
        resolution_args=("--preset", "tiny_cpu_deit", "--compare", "tiny_cpu", "--batch-size", "4", "--steps", "1",
                         "--repeats", "2", "--warmup", "1"),
        convert_args=("--repeats", "1", "--workers", "1", "--classes", "2", "--per-class", "6"))


def dataset(work: Path, resolution: int) -> Path:
    return work / ("full" if resolution == 0 else f"r{resolution}")


def build_data(suite: Suite, work: Path, console: Console) -> None:
    """The sample tree and one conversion per stored resolution; kept across runs (the converter resumes an
    identical OUT and refuses one made with other settings)."""
    from pipelines.convert.job import ConvertSettings, convert
    from pipelines.convert.sample import make_sample
    source = work / "source"
    done = source / ".complete"
    if not done.exists():
        console.print(f"generating {suite.classes} x {suite.unique_per_class} ImageNet-size images in {source}, "
                      f"linked to {suite.per_class} per class")
        make_sample(source, classes=suite.classes, per_class=suite.unique_per_class, val_per_class=0,
                    workers=os.cpu_count() or 1)
        replicate(source / "train", suite.per_class)
        done.touch()
    for resolution in sorted({*suite.resolutions, suite.scaling_resolution, suite.train_resolution}):
        out = dataset(work, resolution)
        if not (out / "manifest.json").exists():
            console.print(f"converting at --max-resolution {resolution} into {out}")
            convert(source, out, ConvertSettings(max_resolution=resolution), console=Console(quiet=True))


def replicate(train: Path, per_class: int) -> None:
    """Fills each class directory up to `per_class` images with hard links to its generated ones, in turn."""
    for directory in sorted(d for d in train.iterdir() if d.is_dir()):
        originals = sorted(directory.iterdir())
        for n in range(len(originals), per_class):
            target = directory / f"{directory.name}_copy{n}.JPEG"
            if not target.exists():
                os.link(originals[n % len(originals)], target)


def run_part(part: str, suite: Suite, work: Path, results: Path, console: Console) -> None:
    """Runs one part; raises if any of its measurements failed (after the others ran and were recorded)."""
    # every loader kind (the benchmarks' default): one whose library does not import here is skipped, with the
    # reason, by the benchmark itself (pipelines raise LoaderUnavailable; importing ffcv loads its C part)
    common = ("--device", suite.device, "--results", str(results))
    codes = []
    if part == "data":
        build_data(suite, work, console)
    elif part == "loaders":
        for resolution in suite.resolutions:
            # DALI's webdataset reader beside its index reader, and RandAugment on against off, on the data the
            # training part reads
            train_data = resolution == suite.train_resolution
            readers = ["--dali-webdataset", "--rand-augment", RAND_AUGMENT] if train_data else []
            codes.append(loaders_bench.main(["--data", str(dataset(work, resolution)), *common, *readers,
                                             "--workers", str(max(suite.scaling_workers)), *suite.loader_args]))
        # the two-view (SimCLR) augmentation, on the data the training part reads
        codes.append(loaders_bench.main(["--data", str(dataset(work, suite.train_resolution)), *common,
                                         "--views", "2", "--workers", str(max(suite.scaling_workers)),
                                         *suite.loader_args]))
    elif part == "scaling":
        codes.append(loaders_bench.main(["--data", str(dataset(work, suite.scaling_resolution)), *common,
                                         "--workers", *map(str, suite.scaling_workers), *suite.loader_args]))
    elif part == "train":
        data = ("--data", str(dataset(work, suite.train_resolution)))
        codes.append(train_bench.main([*data, *common, "--profile", str(work / "profiles"),
                                       *suite.train_args]))
    elif part in TRAIN_PARTS:  # a self-supervised objective at the supervised run's batch, no profile: simclr
        # through the same model (two views per image), mae and colorize with their own preset (their network)
        data = ("--data", str(dataset(work, suite.train_resolution)))
        preset = dict(suite.objective_presets).get(part)
        train_args = with_preset(suite.train_args, preset) if preset else suite.train_args
        codes.append(train_bench.main([*data, *common, "--objective", part, *train_args]))
    elif part == "resolution":
        codes.append(resolution_bench.main([*common, *suite.resolution_args]))
    elif part == "convert":
        codes.append(convert_bench.main([*suite.convert_args, "--results", str(results)]))
    if any(codes):
        raise RuntimeError(f"{part}: some measurements failed; their errors are above and in the records")


def with_preset(args: tuple[str, ...], preset: str) -> list[str]:
    """`args` with the value of their --preset replaced by `preset`."""
    out = list(args)
    out[out.index("--preset") + 1] = preset
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["cpu", "gpu", "all"], required=True)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the plumbing in seconds")
    p.add_argument("--results", type=Path, default=record.RESULTS, help="where the records go")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "bench",
                   help="generated data and profiler traces (default: %(default)s)")
    p.add_argument("--deadline-s", type=float, default=None, help="start no part after this many seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    import torch
    names = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    if "gpu" in names and not args.dry_run and not torch.cuda.is_available():
        console.print("[red]the gpu suite needs a CUDA device, and torch sees none here; "
                      "run --suite cpu, or --suite gpu --dry-run to check the plumbing[/red]")
        return 2
    start, failed, skipped = time.monotonic(), [], []
    for name in names:
        suite = suites(os.cpu_count() or 1)[name]
        suite = dry(suite) if args.dry_run else suite
        work = args.work / (f"{name}-dry" if args.dry_run else name)
        for part in PARTS:
            if part not in args.only and not (part == "data" and set(args.only) & {"loaders", "scaling",
                                                                                  *TRAIN_PARTS}):
                continue
            if args.deadline_s is not None and time.monotonic() - start > args.deadline_s:
                skipped.append(f"{name}:{part}")
                continue
            console.rule(f"{name} suite: {part}")
            t0 = time.monotonic()
            try:
                run_part(part, suite, work, args.results, console)
            except Exception:  # one broken part must not cost the others' figures (the GPU window is short)
                console.print(traceback.format_exc())
                failed.append(f"{name}:{part}")
            console.print(f"[dim]{name}:{part} took {time.monotonic() - t0:.0f} s[/dim]")
    if skipped:
        console.print(f"[red]out of time, not run: {', '.join(skipped)}[/red]")
    if failed:
        console.print(f"[red]FAILED: {', '.join(failed)}[/red]")
    if failed or skipped:
        return 1
    console.print(f"records in {args.results}; render them with: python -m benchmarks.report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
