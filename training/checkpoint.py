"""Checkpoints: written atomically (a temporary file, then a rename), read with weights_only=True.

A checkpoint holds the model's state dict under timm's key names (so `timm.create_model(name,
num_classes=N, checkpoint_path=...)` or `load_state_dict(ckpt["model"])` works), the optimizer, scheduler and
GradScaler states, the position (completed epochs, the batch reached in the current epoch, the optimizer
step), the torch RNG states, the best holdout figures so far and the resolved config.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

LAST, BEST = "last.pt", "best.pt"


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not land before the bytes do (a crash would leave a stub)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def find(given: str, flag: str = "--resume", names: tuple[str, ...] = (LAST,)) -> Path:
    """`given` is a checkpoint file, or a run directory: its checkpoints/<the first of `names` that exists>.
    --resume takes last.pt; --init prefers best.pt, then last.pt."""
    path = Path(given)
    if path.is_dir():
        candidates = [path / "checkpoints" / name for name in names]
        path = next((c for c in candidates if c.is_file()), candidates[-1])
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {given}: no checkpoint at {path} (pass a .pt file from a run's "
                                "checkpoints/ or the run directory)")
    return path


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
