"""Pre-trains a timm model (ViT-B/16 by default) on a converted ImageNet with any loader.

    python training/run.py --loader dali --data OUT                      # the default recipe (vit_b16_seed)
    python training/run.py --preset tiny_cpu --data OUT --device cpu     # a small ViT on a CPU
    python training/run.py --resume runs/NAME                            # continue where it stopped
    python training/run.py --preset simclr_vit_b16 --data OUT            # self-supervised (k-NN evaluated)
    python training/run.py --init runs/NAME --finetune linear --data OUT # transfer: a linear probe
    torchrun --nproc-per-node 8 training/run.py --loader dali --data OUT # DDP, one process per GPU

Flags set the common fields; `--set section.field=value` reaches any field of training/config.py. The run
directory gets config.yaml, metrics.jsonl, summary.json, checkpoints/{last,previous,best}.pt and, with
tensorboard installed, TensorBoard events in tb/.

Nothing is lost (docs/training.md, "Resume, preemption, failures"):
- A new run into a directory that holds a run is refused (exit 2); --overwrite moves the old run aside.
- last.pt is saved every train.checkpoint_every_min minutes (default 10) and at each epoch's end, atomically,
  with the one before kept as previous.pt. After a kill -9 at any moment, --resume RUN_DIR continues from the
  newest complete one and ends with the weights an uninterrupted run has.
- SIGINT or SIGTERM: training runs to the end of the log interval, a checkpoint is saved, and the run exits 0
  saying how to resume. A checkpoint the disk refuses stops the run (exit 1) with the last good one in place.
- A config mistake (a key, a loader option, a model keyword, a path) is exit 2 with one line, before any work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from pipelines import KINDS, build_loader, check_options  # noqa: E402
from pipelines.formats.manifest import DatasetError, load_manifest  # noqa: E402
from pipelines.loaders.errors import DeviceOutOfMemory  # noqa: E402
from training import checkpoint, knn, rundir  # noqa: E402
from training import model as models  # noqa: E402
from training.model import compile_for_evaluation, compile_for_training  # noqa: E402
from training.checkpoint import CheckpointError  # noqa: E402
from training.config import (Config, ConfigError, ModelConfig, TrainConfig, apply_overrides, check_recipe,  # noqa: E402
                             config_from_dict, load_config, preset_names, ramp_of, rand_augment_of)
from training.distributed import Dist, cleanup, setup  # noqa: E402
from training.loop import NonFiniteLoss, Step, TrainState, evaluate, train_epoch  # noqa: E402
from training import objectives  # noqa: E402
from training.objectives import (OBJECTIVES, Objective, build_network, build_objective,  # noqa: E402
                                 checkpoint_weights, load_checkpoint_weights)
from training.optim import build_optimizer, build_scheduler, check_fused  # noqa: E402
from training.precision import DTYPES, autocast_factory  # noqa: E402
from training.progress import RunLog  # noqa: E402
from training.transfer import freeze, load_backbone  # noqa: E402

# The flags that set one config field each: (flag, field, type, help). parse_args adds them and resolve_config
# turns the given ones into overrides of their fields; every other field is reached with --set.
FLAGS = (
    ("--loader", "data.loader", str, " | ".join(KINDS)),
    ("--data", "data.path", str, "OUT of tools/convert_imagenet.py"),
    ("--model", "model.name", str, "any timm model name"),
    ("--epochs", "train.epochs", int, "epochs to train"),
    ("--batch-size", "data.batch_size", int, "per GPU (per process)"),
    ("--lr", "optim.lr", float, "AdamW's peak learning rate"),
    ("--image-size", "data.image_size", int, "the side of the square crops, in pixels"),
    ("--device", "train.device", str, "auto | cuda | cpu"),
    ("--precision", "train.precision", str, " | ".join(DTYPES)),
    ("--workers", "data.workers", int, "loader CPU threads or processes per rank"),
    ("--out", "run.out", str, "parent of the run directories (default: runs)"),
    ("--name", "run.name", str, "the run directory's name (default: <preset>-<loader>-<time>)"),
    ("--objective", "train.objective", str, " | ".join(OBJECTIVES)),
    ("--init", "model.init", str, "start from this checkpoint's backbone (a .pt file or a run directory)"),
    ("--finetune", "model.finetune", str, "full (default) | linear (a linear probe on the frozen backbone)"),
    ("--freeze-blocks", "model.freeze_blocks", int, "freeze the patch embedding and the first K blocks"),
)


def flag_dest(flag: str) -> str:
    """argparse's attribute name for a flag: --batch-size -> batch_size."""
    return flag.removeprefix("--").replace("-", "_")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b16_seed", help=f"one of: {', '.join(preset_names())}")
    for flag, field_name, kind, text in FLAGS:
        p.add_argument(flag, type=kind, help=f"{text} [{field_name}]")
    p.add_argument("--resume", help="a run directory or checkpoint to continue from (its config is reused)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even where one exists: the old run directory is moved aside, not deleted")
    p.add_argument("--no-compile", action="store_true", help="train without torch.compile [model.compile=false]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set optim.warmup_epochs=0 (repeatable)")
    return p.parse_args(argv)


def flag_overrides(args: argparse.Namespace) -> list[dict]:
    """The given FLAGS as overrides of their fields, with the values argparse typed (a --name of 123 stays the
    string '123')."""
    overrides = []
    for flag, field_name, _, _ in FLAGS:
        value = getattr(args, flag_dest(flag))
        if value is not None:
            override = value
            for part in reversed(field_name.split(".")):
                override = {part: override}
            overrides.append(override)
    return overrides


def resolve_config(args: argparse.Namespace, say) -> tuple[Config, dict | None, Path | None]:
    """The preset, or the resumed run's saved config, then the flags, then --set. For --resume, also the
    checkpoint it continues from (None for a run stopped before its first one) and the run directory."""
    overrides = flag_overrides(args)
    overrides += ["model.compile=false"] if args.no_compile else []
    overrides += args.set
    if not args.resume:
        return load_config(args.preset, overrides), None, None
    if args.overwrite:
        raise ConfigError("--overwrite starts a new run, --resume continues one: pass one of them")
    given = Path(args.resume)
    if given.is_file():  # a checkpoint named explicitly is used as it is, or not at all
        saved, run_dir = checkpoint.load(given, checkpoint.RESUME_KEYS), given.parent.parent
    elif given.is_dir():
        found, run_dir = checkpoint.newest_complete(given, say), given
        saved = found[1] if found else None
    else:
        raise FileNotFoundError(f"--resume {given}: no such run directory or checkpoint file")
    if saved is not None:
        return apply_overrides(config_from_dict(saved["config"]), overrides), saved, run_dir
    saved_config = given / "config.yaml"
    if not saved_config.is_file():
        raise ConfigError(f"--resume {given}: not a run directory (it has neither checkpoints/{checkpoint.LAST} "
                          "nor config.yaml)")
    try:
        config = config_from_dict(yaml.safe_load(saved_config.read_text()) or {})
    except yaml.YAMLError as e:
        raise ConfigError(f"--resume {given}: {saved_config} is not valid YAML ({e})") from None
    say(f"{given} has no checkpoint yet (it stopped before its first one): starting it from the beginning, in "
        "the same directory, with its config.yaml")
    return apply_overrides(config, overrides), None, given


def new_run_directory(config: Config) -> Path:
    name = config.run.name or f"{config.preset}-{config.data.loader}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    return Path(config.run.out) / name


def check_before_work(config: Config, manifest: dict) -> None:
    """The mistakes that would otherwise surface only when the loaders or the model are built, after the run
    directory exists: a loader option, a model keyword, a split the dataset lacks, a recipe that cannot work
    (config.check_recipe: a shrinking ramp, a size the patch does not divide; the objective's own rules, such as
    mixup with a self-supervised objective). Raises ConfigError."""
    try:
        check_options(config.data.loader, config.data.options)
    except (ValueError, ImportError) as e:  # ImportError: the loader's library is not installed
        raise ConfigError(f"data.options {config.data.options}: {e}" if isinstance(e, ValueError) else str(e)) from None
    patch = models.check(config.model, config.data.image_size, dynamic_size=bool(config.data.ramp.start_size))
    check_recipe(config, patch)
    objectives.check(config)
    splits = [s for s, info in manifest["splits"].items() if info["samples"]]
    if config.data.train_split not in splits:
        raise ConfigError(f"data.train_split: the dataset has no split '{config.data.train_split}' "
                          f"(it has {', '.join(splits)})")


class WindowEnd:
    """Called by train_epoch at the end of each log window, where the host already waits for the device. Saves
    a mid-epoch checkpoint when train.checkpoint_every_min has passed since the last one, and says whether to
    stop: SIGINT/SIGTERM, or train.stop_at_step reached (train to the end of the log interval, save, exit 0; a
    second SIGINT stops at once). Under DDP the ranks reduce both decisions, so that they all save, or stop, at
    the same step."""

    def __init__(self, console: Console, state: TrainState, config: TrainConfig, device: torch.device,
                 save, writer: checkpoint.Writer):
        self.requested, self.console, self.state, self.device = False, console, state, device
        self.at_step = config.stop_at_step if config.stop_at_step > state.step else 0  # a resume goes past it
        self.every_s, self.save, self.writer = config.checkpoint_every_min * 60, save, writer
        self.saved()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        """Puts back the handlers from before: a process forked after training (a multiprocessing pool's
        worker) must die on the SIGTERM its pool sends it, not set this flag."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint and stopping "
                           "at the next log interval (Ctrl-C again to stop at once, unsaved)[/yellow]")

    def __call__(self) -> bool:
        """Whether to stop; under DDP, true on every rank once any rank was signalled (a rank that stopped
        alone would leave the others waiting in their next all-reduce). Raises the CheckpointError of a
        background write that failed."""
        self.writer.check()
        stop, due = self._decide()
        if due and not stop:  # a stop saves anyway
            self.save()
        return stop

    def stop_requested(self) -> bool:
        return self._decide()[0]

    def _decide(self) -> tuple[bool, bool]:
        stop = self.requested or 0 < self.at_step <= self.state.step
        due = 0 < self.every_s <= time.monotonic() - self.last_save
        if torch.distributed.is_initialized():
            flags = torch.tensor([int(stop), int(due)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, due = (bool(f) for f in flags.tolist())
        return stop, due


def loaders(config: Config, dist: Dist, manifest: dict, objective: Objective):
    """The train loader (with the objective's views), the eval loaders and, for the self-supervised objectives,
    the k-NN bank: the bank split read with eval transforms (None for supervised runs)."""
    data = config.data
    common = dict(batch_size=data.batch_size, image_size=data.image_size, device=dist.device,
                  dtype=DTYPES[config.train.precision], rank=dist.rank, world_size=dist.world_size,
                  seed=config.train.seed, workers=data.workers or None, options=data.options)
    train = build_loader(data.loader, data.path, data.train_split, train=True, views=objective.views,
                         rand_augment=rand_augment_of(config), ramp=ramp_of(config), **common)
    evals = {split: build_loader(data.loader, data.path, split, train=False, **common)
             for split in data.eval_splits if split in manifest["splits"] and manifest["splits"][split]["samples"]}
    bank = None if objective.supervised else build_loader(data.loader, data.path, config.ssl.knn_bank, train=False,
                                                          **common)
    return train, evals, bank


def pictured_images(objective: Objective, eval_batches: dict) -> torch.Tensor | None:
    """The first `objective.pictured` images of the holdout (or the first eval split), read once: the same
    images at every evaluation, so that a run's pictures show how the network's work changes. None when the
    objective draws no pictures or there is no eval split."""
    if not objective.pictured or not eval_batches:
        return None
    batches = eval_batches.get("holdout") or next(iter(eval_batches.values()))
    batches.set_epoch(0)
    images, _ = next(iter(batches))  # an eval loader iterated again repeats its epoch (pipelines/contract.py)
    return images[:objective.pictured].clone()


def build_model(config: Config, objective: Objective, num_classes: int, dist: Dist, saved: dict | None,
                console: Console) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The network the objective trains (training/objectives), with --init's backbone loaded into it (not on
    a resume: the checkpoint holds the weights) and --finetune / --freeze-blocks applied. Raises ConfigError
    (TransferError) for a checkpoint or freezing that does not fit, FileNotFoundError for a missing --init."""
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    network = build_network(config, objective, num_classes, sync_bn=dist.world_size > 1 and dist.device.type == "cuda")
    if config.model.init and saved is None:
        load_backbone(objective.backbone(network), config.model.init,
                      say=console.print if dist.main else lambda _: None)
    return network, freeze(objective.backbone(network), config, supervised=objective.supervised)


def error(console: Console, message: object) -> None:
    """One line, never wrapped, so that logs and scripts get the whole message; escaped: '[Errno 28]' is text."""
    console.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    say = lambda text: console.print(escape(text), soft_wrap=True)  # noqa: E731
    # Everything that can be wrong with the config, the paths or the run directory is found here, before a file
    # is written: exit 2 with one line.
    try:
        config, saved, resumed_dir = resolve_config(args, say)
        if not config.data.path:
            raise ConfigError("no dataset: pass --data OUT (the output of tools/convert_imagenet.py)")
        dist = setup(config.train.device)
        manifest = load_manifest(Path(config.data.path))
        check_before_work(config, manifest)
        if saved is not None and config.train.ema_decay and "model_ema" not in saved:
            raise ConfigError("train.ema_decay is set, but the checkpoint resumed from has no EMA weights: resume "
                              "with --set train.ema_decay=0, or start a new run")
        objective = build_objective(config, manifest["num_classes"])
        check_fused(config.optim, dist.device)
        model, frozen = build_model(config, objective, manifest["num_classes"], dist, saved, console)
        run_dir = resumed_dir or new_run_directory(config)
        # Held until this process ends (a kill -9 frees it too): a second process on this directory is refused.
        lock = rundir.claim(run_dir, resume=resumed_dir is not None, overwrite=args.overwrite,
                            say=say) if dist.main else None
    except (ConfigError, DatasetError, FileNotFoundError, RuntimeError) as e:  # CheckpointError included
        error(console, e)
        return 2
    resume_step = None if resumed_dir is None else (saved["position"]["step"] if saved else 0)
    log = RunLog(run_dir, config, main=dist.main, console=console, resume_step=resume_step)
    try:
        return train(config, saved, dist, manifest, run_dir, log, console, objective, model, frozen)
    finally:
        log.close()
        cleanup()
        if lock is not None:
            lock.close()


def train(config: Config, saved: dict | None, dist: Dist, manifest: dict, run_dir: Path, log: RunLog,
          console: Console, objective: Objective, model: torch.nn.Module, frozen: list[torch.nn.Module]) -> int:
    num_classes = manifest["num_classes"]
    train_batches, eval_batches, bank_batches = loaders(config, dist, manifest, objective)

    model = model.to(dist.device)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # only the parameters that require gradients (not frozen); fused under fp16 on a GPU (optim.uses_fused)
    optimizer = build_optimizer(model, config.optim, loss_scaling=config.train.precision == "fp16")
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch=len(train_batches),
                                epochs=config.train.epochs)
    # fp16's loss scaling; disabled, the scaler passes every call through (and saves an empty state)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=config.train.precision == "fp16")
    state = TrainState()
    ema = None
    if config.train.ema_decay:
        from timm.utils import ModelEmaV3
        # A copy of the model (on its device, in float32) that each step moves toward the trained weights:
        # one foreach lerp over the parameters, no sync.
        ema = ModelEmaV3(model, decay=config.train.ema_decay, use_warmup=config.train.ema_warmup)
    if saved is not None:
        load_checkpoint_weights(model, saved)
        objective.load_state_dict(saved.get("objective_state", {}))
        if ema is not None:
            ema.module.load_state_dict(saved["model_ema"])  # main() checked that it is there
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # {}: saved by a disabled scaler (not fp16), which an enabled one cannot load
            scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["position"], best=saved["best"])
        checkpoint.set_rng_state(saved["rng"])
        console.print(f"resuming {run_dir} at epoch {state.epoch}, batch {state.batch} (step {state.step})")

    # DDP first, then compile (the order torch's DDP + compile integration expects). `model` stays the plain
    # module: it is what checkpoints save (timm's key names) and what evaluation runs (no recompiles).
    trained = model
    if dist.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    ramp = ramp_of(config)
    trained = compile_for_training(trained, config.model, sizes=len(ramp.distinct_sizes()) if ramp else 1)
    autocast = autocast_factory(config.train.precision, dist.device)
    step = Step(trained, optimizer, scheduler, scaler, autocast, config.optim.grad_clip, objective, tuple(frozen),
                ema=ema, ema_of=model, seed=config.train.seed, rank=dist.rank)
    last_path = run_dir / "checkpoints" / checkpoint.LAST
    writer = checkpoint.Writer()  # rank 0's checkpoints, written on a side thread

    def save_last() -> None:
        if dist.main:
            writer.save(last_path, {
                "num_classes": num_classes, **checkpoint_weights(model), "objective_state": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                **({"model_ema": ema.module.state_dict()} if ema is not None else {}),
                "position": {"epoch": state.epoch, "batch": state.batch, "step": state.step},
                "best": state.best, "rng": checkpoint.rng_state(), "config": config.to_dict()}, keep_previous=True)
        window_end.saved()
    window_end = WindowEnd(console, state, config.train, dist.device, save_last, writer)

    # What evaluation runs for each set of weights: the plain module, or its compiled twin (model.compile_eval)
    evaluated = {id(weights): compile_for_evaluation(weights, config.model)
                 for weights in (model, *([ema.module] if ema is not None else []))}

    def evaluate_all(network: torch.nn.Module, weights: str) -> dict:
        """Supervised: top-1/top-5 on each eval split. Self-supervised: k-NN top-1 of the frozen backbone's
        features. Logged, with the objective's picture of a few fixed holdout images."""
        if objective.supervised:
            results = {split: evaluate(evaluated[id(network)], batches, num_classes=num_classes, autocast=autocast)
                       for split, batches in eval_batches.items()}
        else:
            results = knn.evaluate(objective.backbone(network), bank_batches, eval_batches, num_classes=num_classes,
                                   k=config.ssl.knn_k, temperature=config.ssl.knn_temperature, autocast=autocast)
        log.evaluation(state, results, weights=weights)
        if shown is not None and dist.main:
            log.picture(state, objective.pictures(network, shown, autocast), weights=weights)
        return results

    shown = pictured_images(objective, eval_batches) if dist.main else None
    start = time.perf_counter()
    log.start(epochs=config.train.epochs, steps=len(train_batches), state=state)
    try:
        while state.epoch < config.train.epochs:
            try:
                finished = train_epoch(step, train_batches, state, world_size=dist.world_size,
                                       log_every=config.train.log_every, log=log.train, progress=log.progress,
                                       window_end=window_end)
            except NonFiniteLoss as e:
                writer.wait()  # a checkpoint being written is from before the bad window: a good one
                kept = f"the last good checkpoint is {last_path}" if last_path.exists() else "no checkpoint was saved"
                console.print(f"[red]stopped:[/red] {escape(str(e))}. Nothing was saved over it: {kept}. Try a "
                              "lower optim.lr, a longer optim.warmup_epochs or --set optim.grad_clip=1.0")
                return 1
            if not finished:
                save_last()
                writer.wait()
                console.print(f"stopped at epoch {state.epoch}, batch {state.batch} (step {state.step}); "
                              f"checkpoint {last_path}\nresume with: python training/run.py --resume {run_dir}")
                return 0
            state.epoch, state.batch = state.epoch + 1, 0
            if state.epoch % config.train.eval_every == 0 or state.epoch == config.train.epochs:
                # The raw weights, and the EMA's beside them; best.pt is picked on (and holds) train.best_on's.
                results = evaluate_all(model, "raw")
                metric = objective.best_metric
                chosen, weights = results, model
                if ema is not None:
                    ema_results = evaluate_all(ema.module, "ema")
                    if config.train.best_on == "ema":
                        chosen, weights = ema_results, ema.module
                holdout = chosen.get("holdout") or next(iter(chosen.values()), None)
                if holdout and holdout[metric] > state.best.get(metric, -1.0):
                    state.best = {**holdout, "epoch": state.epoch, "weights": config.train.best_on}
                    if dist.main:
                        writer.save(run_dir / "checkpoints" / checkpoint.BEST,
                                    {"num_classes": num_classes, **checkpoint_weights(weights),
                                     "config": config.to_dict(), "metrics": holdout, "epoch": state.epoch,
                                     "weights": config.train.best_on})
            save_last()
            if window_end.stop_requested():
                writer.wait()
                console.print(f"stopped after epoch {state.epoch}; resume with: python training/run.py --resume "
                              f"{run_dir}")
                return 0
        writer.wait()
    except CheckpointError as e:
        error(console, f"{e}. Training stopped. Free space or fix the directory's permissions, then continue "
                       f"with: python training/run.py --resume {run_dir}")
        return 1
    except (DatasetError, DeviceOutOfMemory) as e:  # a loader's verdict, naming the file or what to lower
        kept = f"the last checkpoint is {last_path}" if last_path.exists() else "no checkpoint was saved"
        error(console, f"{e}. Training stopped; {kept} (resume with: python training/run.py --resume {run_dir})")
        return 1
    finally:
        window_end.close()
        with contextlib.suppress(CheckpointError):
            writer.wait()  # a write still running ends before the process does (an error was reported above)
    summary = log.finish(state, wall_s=time.perf_counter() - start)
    if dist.main:
        console.print_json(json.dumps(summary))
        console.print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
