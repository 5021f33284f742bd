"""What a run shows and writes: a rich progress display, metrics.jsonl, TensorBoard events (when tensorboard
is installed), config.yaml and summary.json. Only rank 0 writes or draws; the other ranks' calls do nothing."""
from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipelines.formats.files import atomic_write_bytes

from . import rundir


def describe(figures: dict) -> str:
    """One evaluation's figures: top-1/top-5/loss (supervised) or k-NN top-1 (self-supervised, training/knn.py)."""
    if "knn_top1" in figures:
        return (f"k-NN top-1 {figures['knn_top1']:.2%}  ({figures['samples']:,} images against a bank of "
                f"{figures['bank']:,})")
    took = f" in {figures['seconds']:.1f} s" if "seconds" in figures else ""
    return (f"top-1 {figures['top1']:.2%}  top-5 {figures['top5']:.2%}  loss {figures['loss']:.3f}  "
            f"({figures['samples']:,} images{took})")


class RunLog:
    """`resume_step`: the optimizer step a resumed run continues from (0 for a run restarted from its beginning),
    None for a new run. The metrics logged after it are superseded (training/rundir.py), and TensorBoard drops
    its events after it (SummaryWriter's purge_step), so both read as one uninterrupted run."""

    def __init__(self, run_dir: Path, config, *, main: bool, console: Console, resume_step: int | None = None):
        self.run_dir, self.main, self.console = run_dir, main, console
        self.rates: list[float] = []
        self.waits: list[float] = []
        self.last_eval: dict = {}
        self.progress = self._noop
        self.writer = None
        self.display = None
        if not main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # atomically: a kill while writing must not leave a torn config.yaml to resume from
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        superseded = rundir.supersede(run_dir, resume_step) if resume_step is not None else 0
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        if resume_step is not None:
            self._write({"kind": "resume", "step": resume_step, "superseded": superseded})
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _noop(*_args, **_kwargs) -> None:
        pass

    def start(self, *, epochs: int, steps: int, state) -> None:
        if not self.main:
            return
        self.epochs, self.steps = epochs, steps
        self.display = Progress(TextColumn(f"epoch {{task.fields[epoch]}}/{epochs}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                console=self.console, transient=False)
        self.task = self.display.add_task("train", total=steps, completed=state.batch, epoch=state.epoch + 1,
                                          stats="")
        self.display.start()
        self.progress = self._advance

    def _advance(self, batch: int) -> None:
        self.display.update(self.task, completed=batch)

    def _write(self, record: dict) -> None:
        self.metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.metrics.flush()

    def train(self, record: dict) -> None:
        if not self.main:
            return
        self.rates.append(record["images_per_s"])
        self.waits.append(record["input_wait"])
        self._write(record)
        self.display.update(self.task, epoch=record["epoch"] + 1, completed=record["batch"],
                            stats=f"loss {record['loss']:.3f}  lr {record['lr']:.2e}  "
                                  f"{record['images_per_s']:,.0f} img/s  input wait {record['input_wait']:.0%}")
        if self.writer:
            for key in ("loss", "lr", "images_per_s", "input_wait"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def evaluation(self, state, results: dict, weights: str = "raw") -> None:
        """`weights`: raw (the trained weights) or ema (their moving average, train.ema_decay)."""
        if not self.main:
            return
        self.last_eval[weights] = results
        for split, figures in results.items():
            self._write({"kind": "eval", "split": split, "weights": weights, "epoch": state.epoch,
                         "step": state.step, **figures})
            self.console.print(f"epoch {state.epoch} {split}{' (EMA)' if weights == 'ema' else ''}: "
                               f"{describe(figures)}")
            if self.writer:
                for key in ("top1", "top5", "loss", "knn_top1"):
                    if key in figures:
                        self.writer.add_scalar(f"{split}{'_ema' if weights == 'ema' else ''}/{key}", figures[key],
                                               state.step)
        if state.epoch < self.epochs and weights == "raw":
            self.display.reset(self.task, total=self.steps, epoch=state.epoch + 1, stats="")

    def picture(self, state, grid, weights: str = "raw") -> None:
        """An objective's picture of its work (Objective.pictures: a 3 x H x W grid in [0, 1]) at an evaluation:
        pictures/epoch-NNN[-ema].png in the run directory, and TensorBoard's image tab."""
        if not self.main or grid is None:
            return
        from torchvision.utils import save_image
        suffix = "-ema" if weights == "ema" else ""
        path = self.run_dir / "pictures" / f"epoch-{state.epoch:03d}{suffix}.png"
        path.parent.mkdir(exist_ok=True)
        save_image(grid.float().cpu(), path)
        self._write({"kind": "picture", "weights": weights, "epoch": state.epoch, "step": state.step,
                     "path": str(path.relative_to(self.run_dir))})
        if self.writer:
            self.writer.add_image(f"pictures{suffix}", grid.float().cpu(), state.step)

    def finish(self, state, *, wall_s: float) -> dict:
        """summary.json: final and best holdout figures (top-1, or k-NN top-1 for SSL runs), throughput, wall time."""
        summary = {"epochs": state.epoch, "steps": state.step, "final": self.last_eval.get("raw", {}),
                   **({"final_ema": self.last_eval["ema"]} if "ema" in self.last_eval else {}), "best": state.best,
                   "images_per_s": statistics.median(self.rates) if self.rates else None,
                   "input_wait": statistics.median(self.waits) if self.waits else None,
                   "wall_s": round(wall_s, 1), "run_dir": str(self.run_dir)}
        if self.main:
            self.display.stop()
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def close(self) -> None:
        if not self.main:
            return
        if self.display:
            self.display.stop()
        if self.writer:
            self.writer.close()
        self.metrics.close()
