"""Training throughput: images/s of the trainer's own step fed by the synthetic loader and by each real
loader, side by side in one run. real / synthetic is the number the project lives by.

    python -m benchmarks.train_step --data OUT [--preset vit_b16_seed] [--objective supervised|simclr|mae|...]
                                    [--kinds synthetic dali ffcv torchvision]
                                    [--batch-size 64 256] [--steps 30] [--repeats 5] [--warmup 15] [--profile DIR]
                                    [--compile-mode default reduce-overhead] [--fused false true]

One model per batch size and compile mode, compiled once (every loader yields the same shape and dtype, so no
recompile), and trained in turn from each loader with each AdamW implementation (`--fused`): `--warmup` steps
outside the clock (the compile lands there), then `--repeats` windows of `--steps` steps, the device
synchronized at each window's edges; the figure is the median window.

A window lies inside one epoch, as all but one in 600 windows of 30 steps do in an ImageNet epoch (18,016
batches of 64): it continues the epoch when the rest of it holds the window whole, and otherwise starts the
next one, set_epoch(e + 1, 0), with LEAD = 2 untimed steps before the clock (the first batches of an epoch
carry its start). An epoch shorter than that gets windows as long as fit, and the row says so (`window.short_epoch`).

Any objective (training/objectives) is measured: the step sends each batch through the objective's `inputs` and
`loss`, as the trainer does, and images/s counts what the network takes in (each view, for a two-view objective).
MFU counts the training FLOPs of one image the same way (torch's FlopCounterMode over the forward, the loss and
the backward; ~101 GFLOP for supervised ViT-B/16 at 224 px, ~56 for MAE's masked step) against `--peak-tflops`
(default: the GPU's dense bf16 peak, benchmarks/record.py; none on a CPU or in fp32). Peak GPU memory is each
row's own. Writes benchmarks/results/train_step-<stamp>.json, rewritten after every row (a time limit keeps the
rows measured before it), and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import goals, record
from benchmarks.loaders import LEAD, batch_images, close, sync
from benchmarks.record import record_path, summarize, write_record
from pipelines import KINDS, build_loader
from pipelines.contract import LoaderUnavailable
from pipelines.formats.manifest import load_manifest
from training.config import COMPILE_MODES, ConfigError, apply_overrides, load_config
from training.loop import Step, train_step
from training.objectives import OBJECTIVES, build_network, build_objective
from training.optim import build_optimizer, build_scheduler, check_fused
from training.precision import DTYPES, autocast_factory
from training.model import compile_for_training

GOALS = {"synthetic_images_per_s_h100": goals.SYNTHETIC,
         **{f"{kind}_vs_synthetic": target for kind, target in goals.VS_SYNTHETIC.items()}}
EAGER = "none"  # --compile-mode for no torch.compile


def train_flops_per_image(model: torch.nn.Module, objective, image_size: int, num_classes: int,
                          device: torch.device, autocast) -> float:
    """FLOPs of one model input's training step (forward, loss and backward), as torch counts them (matmuls and
    convolutions), per image as the rates count them (each view, for a two-view objective). The batch goes
    through the objective's own `inputs` and `loss`, as the trainer's step sends it: MAE's encoder sees only the
    kept patches, so its count is the masked step's real one. The batch's preparation (`inputs`) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    samples = 2

    def images() -> torch.Tensor:
        shape = (samples, 3, image_size, image_size)
        return torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    batch = tuple(images() for _ in range(objective.views)) if objective.views > 1 else images()
    inputs, targets = objective.inputs(batch, torch.randint(max(num_classes, 1), (samples,), device=device))
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss = objective.loss(model(inputs), targets)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (samples * objective.views)


def default_peak(device: torch.device, precision: str) -> float | None:
    """The tensor-core peak MFU is taken against: bf16 and fp16 share it; fp32 runs on other units."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return record.peak_bf16_tflops(torch.cuda.get_device_name(device))


class PeakMemory:
    """One row's peak of torch's device memory: reset before the row's first step, read after its last. (DALI
    allocates outside torch: its buffers are not in it.)"""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            gc.collect()  # the previous row's batches, held by reference cycles, must not count in this row
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def window_size(epoch_batches: int, steps: int) -> tuple[int, int]:
    """(lead, steps): the untimed steps after an epoch's start and the timed ones, together inside one epoch.
    An epoch of fewer than LEAD + `steps` batches shortens the window; one batch leaves no lead."""
    if epoch_batches < 1:
        raise ValueError("the loader's epoch has no batches: more images, or a smaller --batch-size")
    lead = min(LEAD, epoch_batches - 1)
    return lead, min(steps, epoch_batches - lead)


class EpochCursor:
    """A loader's batches read in order, knowing where the next one is: batch `batch` of epoch `epoch`."""

    def __init__(self, loader):
        self.loader, self.batches = loader, len(loader)
        self.epoch, self.batch, self.iterator = -1, self.batches, iter(())  # the first read starts epoch 0

    def start_epoch(self) -> None:
        self.close()
        self.epoch, self.batch = self.epoch + 1, 0
        self.loader.set_epoch(self.epoch)  # from its first batch (start_batch 0)
        self.iterator = iter(self.loader)

    def left(self) -> int:
        return self.batches - self.batch

    def next(self):
        """The next batch; at an epoch's end the next epoch starts (the warm-up crosses epochs, windows don't)."""
        if self.batch == self.batches:
            self.start_epoch()
        try:
            batch = next(self.iterator)
        except StopIteration:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batch} batches, not the {self.batches} that "
                               f"len() promised") from None
        self.batch += 1
        return batch

    def close(self) -> None:
        """Ends an iteration left before its epoch's end (a generator's `finally` releases its pipeline)."""
        close(self.iterator)


def place_window(cursor: EpochCursor, step: Step, lead: int, steps: int) -> list[int]:
    """Makes the next `steps` batches lie in one epoch: the current one when its rest holds them, else the next
    one after `lead` untimed steps. Returns where the window starts, [epoch, batch]."""
    if cursor.left() < steps:
        cursor.start_epoch()
        for _ in range(lead):
            train_step(step, *cursor.next())
    return [cursor.epoch, cursor.batch]


def measure(step: Step, cursor: EpochCursor, device: torch.device, args) -> dict:
    lead, steps = window_size(cursor.batches, args.steps)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(step, *cursor.next())
    sync(device)
    warmup_s = time.perf_counter() - start  # the compile, on a row that is its model's first
    rates, waits, starts = [], [], []
    for _ in range(args.repeats):
        starts.append(place_window(cursor, step, lead, steps))
        sync(device)
        start, waited, images = time.perf_counter(), 0.0, 0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = cursor.next()
            waited += time.perf_counter() - t0
            train_step(step, *batch)
            images += batch_images(batch)  # views count: each is a model input
        sync(device)
        elapsed = time.perf_counter() - start
        rates.append(images / elapsed)
        waits.append(waited / elapsed)
    # an epoch start is timed only where a window begins at batch 0 (an epoch of one batch, no room for a lead)
    window = {"steps": steps, "lead": lead, "epoch_batches": cursor.batches, "short_epoch": steps < args.steps,
              "epoch_starts_timed": sum(batch == 0 for _, batch in starts), "starts": starts}
    return {"images_per_s": summarize(rates), "input_wait": summarize(waits), "window": window, "warmup_s": warmup_s}


def profile(step: Step, cursor: EpochCursor, device: torch.device, directory: Path, name: str,
            steps: int = 5) -> dict:
    """A torch profiler trace (Chrome format, open in chrome://tracing or Perfetto) of a few training steps,
    with the wait for each batch marked, so that a stall can be put down to the input or to the model.
    Here, unlike the timed windows, the device is synchronized after every step, so that the two ranges are
    wall times: `input_ms` is what the step waited for its batch, `step_ms` what the model took. A loader that
    competes for the GPU or the cores shows as a `step_ms` above synthetic input's. The steps lie inside one
    epoch, as the timed windows do."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lead, steps = window_size(cursor.batches, steps)
    place_window(cursor, step, lead, steps)
    sync(device)
    waits, steps_ms = [], []
    with torch_profile(activities=activities) as trace:
        for _ in range(steps):
            t0 = time.perf_counter()
            with record_function("input: next batch"):
                batch = cursor.next()
            t1 = time.perf_counter()
            with record_function("train step"):
                train_step(step, *batch)
                sync(device)
            waits.append((t1 - t0) * 1e3)
            steps_ms.append((time.perf_counter() - t1) * 1e3)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"trace-{name}.json"
    trace.export_chrome_trace(str(path))
    return {"trace": str(path), "input_ms": statistics.median(waits), "step_ms": statistics.median(steps_ms)}


def measure_row(step: Step, loader, device: torch.device, args, memory: PeakMemory, trace: str) -> dict:
    """One loader's figures with one step: the timed windows, the row's own peak memory and, with --profile,
    a trace named `trace`."""
    cursor = EpochCursor(loader)
    try:
        memory.reset()
        result = measure(step, cursor, device, args)
        peak_memory = memory.read()
        if peak_memory is not None:
            result["peak_memory_gib"] = peak_memory
        if args.profile:
            result["profile"] = profile(step, cursor, device, args.profile, trace)
    finally:
        cursor.close()
    return result


def build_step(model: torch.nn.Module, trained: torch.nn.Module, config, objective, autocast,
               device: torch.device) -> Step:
    """The trainer's step around `trained` (compiled or not), with the AdamW that config.optim asks for."""
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch=1000, epochs=1)
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
    return Step(trained, optimizer, scheduler, scaler, autocast, config.optim.grad_clip, objective)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--preset", default="vit_b16_seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--objective", choices=list(OBJECTIVES), default=None,
                   help="what the step minimizes (default: the preset's); simclr reads two views per image. A "
                        "self-supervised objective's own preset (tiny_cpu_mae, mae_vit_b16, ...) brings its recipe")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="default: the preset's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: all cores)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=15, help="steps before the clock (default: %(default)s)")
    p.add_argument("--compile-mode", nargs="+", choices=[EAGER, *COMPILE_MODES], default=None,
                   help="torch.compile modes to sweep, 'none' for eager (default: the preset's model.compile and "
                        "model.compile_mode)")
    p.add_argument("--no-compile", action="store_true", help="the same as --compile-mode none")
    p.add_argument("--fused", nargs="+", choices=["false", "true"], default=None,
                   help="AdamW implementations to sweep: true is fused, false torch's default for the device "
                        "(foreach on CUDA) (default: the preset's optim.fused)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: the GPU's dense bf16 peak)")
    p.add_argument("--results", type=Path, default=record.RESULTS)
    p.add_argument("--profile", type=Path, metavar="DIR", help="also write a profiler trace per loader into DIR")
    args = p.parse_args(argv)
    if args.no_compile and args.compile_mode:
        p.error("--no-compile and --compile-mode: give one (--compile-mode none is --no-compile)")
    return args


def sweep(args, config) -> tuple[list[str], list[bool]]:
    """The compile modes and AdamW implementations to measure; the preset's when not given."""
    modes = [EAGER] if args.no_compile else args.compile_mode or \
        [config.model.compile_mode if config.model.compile else EAGER]
    fused = [value == "true" for value in args.fused] if args.fused else [config.optim.fused]
    return list(dict.fromkeys(modes)), list(dict.fromkeys(fused))


def with_options(config, mode: str, fused: bool):
    """The config a row trains with: its compile mode and AdamW implementation."""
    model = dataclasses.replace(config.model, compile=mode != EAGER,
                                compile_mode=config.model.compile_mode if mode == EAGER else mode)
    return dataclasses.replace(config, model=model, optim=dataclasses.replace(config.optim, fused=fused))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console, device = Console(), torch.device(args.device)
    overrides = args.set + ([f"train.objective={args.objective}"] if args.objective else [])
    config = apply_overrides(load_config(args.preset), overrides)
    modes, fused_options = sweep(args, config)
    try:
        check_fused(dataclasses.replace(config.optim, fused=any(fused_options)), device)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    num_classes = load_manifest(args.data)["num_classes"]
    objective = build_objective(config, num_classes)
    autocast = autocast_factory(config.train.precision, device)
    peak = args.peak_tflops or default_peak(device, config.train.precision)
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "config": config.to_dict(), "peak_tflops": peak, "device": str(device), "objective": objective.name,
                "compile_modes": modes, "fused_options": fused_options}
    path = record_path("train_step", args.results)
    rows, failed = [], []

    def save() -> None:  # after every row: a time limit that ends the run keeps what was measured
        add_ratios(rows)
        write_record("train_step", {"settings": settings, "goals": GOALS, "results": rows, "failed": failed},
                     path=path)

    memory = PeakMemory(device)
    for batch_size in args.batch_size or [config.data.batch_size]:
        for mode in modes:
            torch.compiler.reset()  # a compile of its own: no graph, shape or recompile count from before
            torch.manual_seed(0)
            model = build_network(config, objective, num_classes).to(device)
            model = model.to(memory_format=torch.channels_last)
            flops = train_flops_per_image(model, objective, config.data.image_size, num_classes, device,
                                          autocast)
            trained = compile_for_training(model, with_options(config, mode, False).model)  # compiled at warm-up
            for fused in fused_options:
                step = build_step(model, trained, with_options(config, mode, fused), objective, autocast, device)
                for kind in args.kinds:
                    label = {"kind": kind, "batch_size": batch_size, "compile_mode": mode, "fused": fused}
                    console.print(f"[dim]batch {batch_size}, compile {mode}, fused {fused}: training from {kind} "
                                  "...[/dim]")
                    try:
                        loader = build_loader(kind, args.data, config.data.train_split, batch_size=batch_size,
                                              image_size=config.data.image_size, train=True, device=device,
                                              dtype=DTYPES[config.train.precision], workers=args.workers,
                                              views=objective.views,
                                              options=config.data.options if kind == config.data.loader else None)
                    except LoaderUnavailable as e:
                        console.print(f"[yellow]skipped {kind}: {e}[/yellow]")
                        continue
                    try:
                        trace = f"{kind}-batch{batch_size}{suffix(modes, fused_options, mode, fused)}"
                        result = measure_row(step, loader, device, args, memory, trace)
                    except Exception as e:  # one broken loader must not cost the others' figures (a short GPU window)
                        console.print(f"[red]{kind}, batch {batch_size}, compile {mode}, fused {fused} failed: "
                                      f"{type(e).__name__}: {e}[/red]")
                        failed.append({**label, "error": f"{type(e).__name__}: {e}"})
                    else:
                        rate = result["images_per_s"]["median"]
                        rows.append({**label, **result, "train_flops_per_image": flops,
                                     "mfu": rate * flops / (peak * 1e12) if peak else None})
                    finally:
                        del loader
                    save()
                del step
            del model, trained
    save()
    markdown(path, rows, config, objective, args, peak, modes, fused_options)
    console.print(table(rows, config, device))
    console.print(f"record: {path} (and .md)")
    return 1 if failed else 0


def suffix(modes: list[str], fused_options: list[bool], mode: str, fused: bool) -> str:
    """A trace name's part for the swept options (none when nothing is swept: the names stay as they were)."""
    return (f"-{mode}" if len(modes) > 1 else "") + (f"-fused{int(fused)}" if len(fused_options) > 1 else "")


def add_ratios(rows: list[dict]) -> None:
    """vs_synthetic: each row over the synthetic row of the same batch size, compile mode and AdamW."""
    def key(row):
        return row["batch_size"], row["compile_mode"], row["fused"]
    synthetic = {key(r): r["images_per_s"]["median"] for r in rows if r["kind"] == "synthetic"}
    for r in rows:
        if key(r) in synthetic:
            r["vs_synthetic"] = r["images_per_s"]["median"] / synthetic[key(r)]


COLUMNS = ("loader", "batch", "compile", "fused", "images/s", "vs synthetic", "input wait", "MFU", "peak GiB")


def cells(r: dict) -> list[str]:
    return [r["kind"], str(r["batch_size"]), r["compile_mode"], "yes" if r["fused"] else "no",
            f"{r['images_per_s']['median']:,.1f}", f"{r['vs_synthetic']:.3f}" if "vs_synthetic" in r else "-",
            f"{r['input_wait']['median']:.1%}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
            f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"]


def markdown(path: Path, rows: list[dict], config, objective, args, peak, modes, fused_options) -> None:
    env = record.environment()
    short = sorted({r["window"]["steps"] for r in rows if r["window"]["short_epoch"]})
    lines = [f"Training images/s ({config.model.name}, {objective.name}, {config.data.image_size} px, "
             f"{config.train.precision}, compile {', '.join(modes)}, fused AdamW "
             f"{', '.join('yes' if f else 'no' for f in fused_options)}), median of {args.repeats} windows of "
             f"{args.steps} steps, each inside one epoch"
             + (f" (epochs too short for them: windows of {', '.join(map(str, short))} steps)" if short else "") + ".",
             f"Hardware: {env['cpu']} ({env['cores']} cores){', ' + env['gpu'] if env['gpu'] else ''}. "
             f"Commit {env['commit']}. MFU against {peak or '-'} TFLOP/s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def table(rows: list[dict], config, device: torch.device) -> Table:
    out = Table(title=f"training images/s ({config.model.name}, {device.type})")
    for column in COLUMNS:
        out.add_column(column, justify="right")
    for r in rows:
        out.add_row(*cells(r))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
