"""One training epoch and one evaluation, top to bottom. The loader's kind never matters here.

No host-device sync inside the step: the loss is summed on the device and read (`.item()`) only every
`log_every` steps, where the clock is read too. Between those points the host queues work ahead of the GPU,
so the host time spent blocked in `next(batches)` is the time the GPU starves for input: that share of the
window is the input-wait % shown and logged.

What is minimized is the Step's objective (training/objectives): supervised cross-entropy by default,
or a self-supervised loss, whose batches may hold two views per image. Every draw a step makes comes from
(seed, rank, step) (training/randomness.py).

Under DDP the window's end is also where the ranks agree: one all-reduce carries each rank's loss and whether it
saw a non-finite one, so a NaN on any rank stops every rank at the same window (none is left waiting in a
collective the others never reach).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from .distributed import all_reduce_sum
from .objectives.base import Objective
from .randomness import seed_step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops without saving over the last good checkpoint."""


@dataclass
class TrainState:
    """What a step changes, besides the model's and optimizer's tensors."""
    epoch: int = 0  # the epoch being trained (completed epochs when saved at an epoch's end)
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps so far
    best: dict = field(default_factory=dict)  # best holdout figures so far


@dataclass
class Step:
    """The pieces of one optimizer step, built once by run.py."""
    model: torch.nn.Module  # compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm CosineLRScheduler, stepped per update
    # Enabled for fp16 only; a disabled scaler's scale, unscale_, step and update pass straight through.
    scaler: torch.amp.GradScaler
    autocast: Callable[[], object]  # a fresh autocast context (or a null one for fp32)
    grad_clip: float
    objective: Objective  # what the step minimizes (training/objectives, build_objective)
    frozen: tuple[torch.nn.Module, ...] = ()  # kept in eval mode while the rest trains (transfer.freeze)
    ema: object | None = None  # timm's ModelEmaV3 of `ema_of` (the plain module), updated after each step
    ema_of: torch.nn.Module | None = None
    seed: int = 0  # train.seed; with the rank, it seeds every draw of a step (training/randomness.py)
    rank: int = 0


def train_step(step: Step, images: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step; returns the loss, still on the device (reading it would sync). `images` is a
    tuple of views for objectives that take several (the loader's views=2)."""
    model, optimizer, scaler = step.model, step.optimizer, step.scaler
    inputs, targets = step.objective.inputs(images, labels)
    with step.autocast():
        loss = step.objective.loss(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # so that clipping sees true gradients
    if step.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), step.grad_clip)
    scaler.step(optimizer)  # fp16: skipped when a gradient is inf or NaN
    scaler.update()
    return loss.detach()


def train_epoch(step: Step, batches, state: TrainState, *, world_size: int, log_every: int,
                log: Callable[[dict], None], progress: Callable[[int], None],
                window_end: Callable[[], bool]) -> bool:
    """Trains from batch `state.batch` to the end of `state.epoch`. `window_end` is called at the end of each
    log window but the epoch's last (run.py's saves a checkpoint when one is due) and returns whether to stop.
    Returns False when stopped early (state.batch says where), True at the epoch's end. Raises NonFiniteLoss."""
    model = step.model
    model.train()
    for module in step.frozen:  # a frozen backbone must not update BN statistics or drop out
        module.eval()
    steps = len(batches)
    # A resumed run starts at the batch it stopped before: the loader seeks there (set_epoch's start_batch), so
    # none of the batches trained before the stop is read again.
    batches.set_epoch(state.epoch, start_batch=state.batch)
    iterator = iter(batches)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_start, waited, images_seen, window_steps = time.perf_counter(), 0.0, 0, 0

    while state.batch < steps:
        wait_start = time.perf_counter()
        images, labels = next(iterator)
        waited += time.perf_counter() - wait_start

        seed_step(step.seed, step.rank, state.step)  # this rank's draws for this step, whatever came before
        loss = train_step(step, images, labels)
        state.batch += 1
        state.step += 1
        step.scheduler.step_update(num_updates=state.step)
        if step.ema is not None:
            step.ema.update(step.ema_of, step=state.step)
        step.objective.after_step(state.step)

        loss_sum += loss
        nonfinite |= ~torch.isfinite(loss)
        images_seen += labels.shape[0]  # images, not views
        window_steps += 1
        progress(state.batch)

        last = state.batch == steps
        if window_steps == log_every or last:  # the window's end: the only place the host waits for the device
            # Every rank's mean loss and non-finite flag, summed across ranks: the mean over ranks is logged, and
            # a NaN on any rank stops them all here, at the same step.
            totals = all_reduce_sum(torch.stack([loss_sum / window_steps, nonfinite.float()])).tolist()  # the sync
            mean_loss, nonfinite_ranks = totals[0] / world_size, int(totals[1])
            if nonfinite_ranks:
                raise NonFiniteLoss(f"the training loss became {mean_loss} within steps "
                                    f"{state.step - window_steps + 1}-{state.step} (epoch {state.epoch}"
                                    + (f", on {nonfinite_ranks} of {world_size} ranks)" if world_size > 1 else ")"))
            elapsed = time.perf_counter() - window_start
            log({"kind": "train", "epoch": state.epoch, "batch": state.batch, "step": state.step,
                 "image_size": (images[0] if isinstance(images, (tuple, list)) else images).shape[-1],
                 "loss": mean_loss, "lr": step.optimizer.param_groups[0]["lr"],
                 "images_per_s": images_seen * world_size / elapsed, "input_wait": waited / elapsed})
            loss_sum.zero_()
            window_start, waited, images_seen, window_steps = time.perf_counter(), 0.0, 0, 0
            # A signal, and a mid-epoch checkpoint, happen here, at most log_every steps late: under DDP the
            # ranks must agree on the step they stop or save at (window_end reduces across them: a collective).
            if not last and window_end():
                return False
    return True


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, *, num_classes: int, autocast: Callable[[], object]) -> dict:
    """Top-1, top-5 and loss over this rank's part of a split, reduced across ranks: every sample once; and the
    seconds it took (the reduction's read-back ends it, so the device's work is counted)."""
    start = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    # validate_args=False: torchmetrics' checks count the labels' distinct values (torch.unique), a stream
    # sync per batch on a GPU; the loaders' labels are in range by contract (check_batch tests it).
    accuracy = dict(num_classes=num_classes, average="micro", validate_args=False)
    top1 = MulticlassAccuracy(top_k=1, **accuracy).to(device)
    top5 = MulticlassAccuracy(top_k=min(5, num_classes), **accuracy).to(device)
    # The counters stay on the device, and nothing is read back before the reduction at the end. The sample
    # count is a Python number added in place: a kernel argument, not a copy from the host.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in batches:
        with autocast():
            logits = model(images)
        logits = logits.float()
        top1.update(logits, labels)
        top5.update(logits, labels)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        seen += labels.numel()
    totals = all_reduce_sum(torch.stack([loss_sum, seen.double()]))
    samples = int(totals[1].item())
    return {"top1": float(top1.compute()), "top5": float(top5.compute()),
            "loss": float(totals[0] / max(samples, 1)), "samples": samples,
            "seconds": round(time.perf_counter() - start, 3)}
