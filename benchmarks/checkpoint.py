"""What a mid-epoch checkpoint costs training: ViT-B/16's whole training state (weights and AdamW's two moments,
1.0 GB in fp32) saved by training/checkpoint.py's Writer, as training/run.py saves it.

    python -m benchmarks.checkpoint [--repeats 3] [--dir build/bench/checkpoints] [--interval-min 10]
                                    [--preset vit_b16_seed]   (the model whose state is saved)

Measured side by side in one run, medians of the repeats:
- `snapshot_s`: the host copy of the state, on the training thread: the time the training loop waits.
- `write_s`: the side thread's CRC32, serialization, fsync and renames, while training goes on.
- `step_slowdown`: how much slower training steps run while the side thread writes (steps timed with the writer
  idle, then busy, alternating). On a GPU the step is the ViT-B/16 bf16 step itself, from synthetic batches of 64;
  on a CPU it is the tiny CPU preset's step, and both compete for the same cores: the worst case.
Projected cost at the interval (train.checkpoint_every_min, default 10):
    (snapshot_s + (step_slowdown - 1) x write_s) / (interval x 60 s)   as a share of training time.
`--dir` should be on the disk the runs go to (the write time is that disk's).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.record import summarize, write_record
from training import checkpoint
from training.config import load_config
from training.model import create_model


def training_state(preset: str, device: torch.device) -> tuple[dict, int]:
    """A preset's model state as run.py saves it, with AdamW's moments filled (one step on zero gradients)."""
    config = load_config(preset)
    model = create_model(config.model, num_classes=1000, image_size=config.data.image_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "position": {"step": 1},
             "rng": checkpoint.rng_state()}
    size = sum(t.numel() * t.element_size() for t in checkpoint._tensors(state))
    return state, size


def step_function(device: torch.device):
    """One training step of the model that trains on this device: ViT-B/16 bf16 on a GPU, the tiny preset on a CPU."""
    preset = "vit_b16_seed" if device.type == "cuda" else "tiny_cpu"
    config = load_config(preset)
    model = create_model(config.model, num_classes=1000, image_size=config.data.image_size).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(config.data.batch_size, 3, config.data.image_size, config.data.image_size,
                         device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (config.data.batch_size,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return step, preset


def measure(state: dict, step, path: Path, repeats: int) -> dict:
    for _ in range(3):
        step()  # warm-up, outside the clock
    snapshots, writes, idle, busy = [], [], [], []
    writer = checkpoint.Writer()
    for _ in range(repeats):
        idle += [step() for _ in range(5)]
        start = time.perf_counter()
        writer.save(path, state, keep_previous=True)
        snapshots.append(time.perf_counter() - start)
        while writer.busy:
            busy.append(step())
        writer.wait()
        writes.append(time.perf_counter() - start - snapshots[-1])
    return {"snapshot_s": summarize(snapshots), "write_s": summarize(writes), "idle_step_s": summarize(idle),
            "busy_step_s": summarize(busy) if busy else None,
            "step_slowdown": statistics.median(busy) / statistics.median(idle) if busy else 1.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path("build/bench/checkpoints"))
    p.add_argument("--interval-min", type=float, default=load_config("vit_b16_seed").train.checkpoint_every_min)
    p.add_argument("--preset", default="vit_b16_seed", help="the model whose training state is saved")
    p.add_argument("--results", type=Path, default=None, help="directory of the record (default benchmarks/results)")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, size = training_state(args.preset, device)
    step, preset = step_function(device)
    figures = measure(state, step, args.dir / "last.pt", args.repeats)
    blocked = figures["snapshot_s"]["median"] + (figures["step_slowdown"] - 1) * figures["write_s"]["median"]
    figures.update(state_bytes=size, file_bytes=(args.dir / "last.pt").stat().st_size, blocked_s=blocked,
                   interval_min=args.interval_min, cost_share=blocked / (args.interval_min * 60))
    path = write_record("checkpoint", {"device": str(device), "preset": args.preset, "step_preset": preset, "directory": str(args.dir),
                                       **figures}, directory=args.results)
    console.print(f"{args.preset} training state {size / 1e9:.2f} GB: training waits {figures['snapshot_s']['median']:.2f} s "
                  f"(host copy), the side thread writes for {figures['write_s']['median']:.2f} s, steps meanwhile "
                  f"x{figures['step_slowdown']:.2f} slower ({preset}); at one checkpoint every "
                  f"{args.interval_min:g} min: {figures['cost_share']:.2%} of training time. Record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
