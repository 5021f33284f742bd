"""One typed config: dataclasses, YAML presets in training/presets/, and checked overrides.

    config = load_config("vit_b16_seed", ["data.loader=ffcv", "optim.lr=5e-4"])

The defaults below are the default recipe (the vit_b16_seed preset). A preset holds exactly the keys whose
values differ from those defaults and none that repeats one, so that it reads as what its recipe changes. Every
key of a preset or an override must be a field, and every value must have the field's type: a typo is an error
that names it, never a silent no-op (ffcv-imagenet's configs carry a `bn_wd` key its script never reads).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines import KINDS  # loader kind -> module; importing it imports no loader (nor torch)

PRESETS = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A preset or override that does not fit the config; the message names the key."""


@dataclass
class RampConfig:
    """Progressive resolution (pipelines.contract.Ramp), ffcv-imagenet's speed trick: train the early epochs at
    a lower resolution (ViT-B/16's step costs about the square of the side: 128 px is ~3x cheaper than 224),
    ramping linearly to data.image_size. Evaluation always runs at data.image_size."""
    start_size: int = 0  # 0: no ramp, every epoch at data.image_size
    end_size: int = 0  # 0: data.image_size (the only other value allowed: the ramp ends where evaluation runs)
    start_epoch: int = 0  # epochs up to this one train at start_size
    end_epoch: int = 0  # from this epoch on, at end_size
    step: int = 32  # sizes are rounded to multiples of this (ffcv-imagenet: 32); a multiple of the patch size


@dataclass
class DataConfig:
    loader: str = "dali"  # a kind of pipelines.KINDS
    path: str = ""  # OUT of tools/convert_imagenet.py
    image_size: int = 224
    batch_size: int = 64  # per rank: under torchrun the global batch is nproc x batch_size
    workers: int = 0  # CPU threads or processes per rank; 0: cores / ranks on the node
    options: dict = field(default_factory=dict)  # the loader's speed knobs (docs/loaders.md, "Speed knobs")
    train_split: str = "train"
    eval_splits: list = field(default_factory=lambda: ["holdout", "val"])  # those the dataset has
    ramp: RampConfig = field(default_factory=RampConfig)


@dataclass
class AugmentConfig:
    """DeiT's augmentation (Touvron et al. 2021), on the device for every loader. Off by default: the default
    recipe augments with random-resized-crop and flip only. RandAugment runs inside the loader, per sample, on the
    uint8 pixels; erasing and mixup/cutmix run on the loader's normalized batch (training/batch_augment.py)."""
    rand_augment: str = ""  # timm's notation, e.g. "rand-m9-mstd0.5-inc1" (DeiT's); "": off
    mixup: float = 0.0  # mixup's Beta(alpha, alpha); 0: off (DeiT: 0.8)
    cutmix: float = 0.0  # cutmix's Beta(alpha, alpha); 0: off (DeiT: 1.0)
    mix_prob: float = 1.0  # share of batches mixed at all
    switch_prob: float = 0.5  # with both on: share of mixed batches that get cutmix instead of mixup
    erasing: float = 0.0  # random erasing's probability per image (DeiT: 0.25), noise-filled ("pixel" mode)


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"  # any timm model name
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (depth, patch_size, ...)
    compile: bool = True
    drop_path_rate: float = 0.0  # stochastic depth: the last block's drop rate, linear in depth (DeiT-B: 0.1)
    patch_drop_rate: float = 0.0  # share of patch tokens dropped in training (timm's ViT patch_drop_rate)
    # torch.compile's mode, when model.compile is true: default | reduce-overhead (CUDA graphs: the step's
    # kernels replayed with one launch, which pays at small batches where launches, not FLOPs, set the pace) |
    # max-autotune (CUDA graphs and a search over matmul kernels, minutes of compile) | max-autotune-no-cudagraphs.
    # "default": the mode this trainer has always compiled with; benchmarks/gpu_check.sh measures it against
    # reduce-overhead (benchmarks.train_step --compile-mode), and a GPU record is what may change it.
    compile_mode: str = "default"
    # Evaluation (supervised top-1/top-5) through a compiled twin of the model as well: one more graph for full
    # batches and one for the last, smaller batch, for the raw weights and the EMA's. Off: evaluation is a few
    # per cent of an epoch's work, and those compiles cost about what they save over a run (docs/training.md,
    # "Evaluation", and the record benchmarks/evaluation.py makes). The k-NN evaluation of the self-supervised
    # objectives runs uncompiled.
    compile_eval: bool = False
    channels_last: bool = True
    # Transfer (training/transfer.py): start from another run's backbone instead of from scratch.
    init: str = ""  # a checkpoint file, or a run directory (its checkpoints/best.pt); "": random init
    finetune: str = "full"  # full: every weight trains | linear: a linear probe on the frozen backbone
    freeze_blocks: int = 0  # full fine-tuning with the patch embedding and the first K blocks frozen


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01  # not applied to biases, norms and embeddings (timm's filter_bias_and_bn)
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # A linear warmup: ViT-B with AdamW at lr 1e-3 is widely reported to diverge without one (DeiT warms up 5 of
    # 300 epochs, ViT 10k steps). 3 epochs is 10 % of the default 30-epoch schedule; 0: none. Whether the
    # default recipe diverges without it: not measured.
    warmup_epochs: float = 3.0
    min_lr: float = 0.0  # where the cosine ends
    grad_clip: float = 0.0  # max global grad norm; 0: off
    label_smoothing: float = 0.0
    # AdamW's fused implementation (one kernel for the whole update) instead of torch's default: foreach
    # (a few kernels per parameter group) on CUDA, a loop over the tensors on the CPU. On 2 shared AMD EPYC
    # cores one optimizer step alone took 2.75 s fused against 6.03 s for ViT-B/16's 86.6 M parameters, and
    # 21-68 ms against 308-464 ms for the tiny CPU ViT's 2.0 M; whole training steps there were too noisy to
    # rank. false keeps torch's default until benchmarks/gpu_check.sh (benchmarks.train_step --fused false
    # true) has measured it on the GPU.
    fused: bool = False


@dataclass
class TrainConfig:
    epochs: int = 30
    precision: str = "bf16"  # bf16 (autocast) | fp16 (autocast + GradScaler) | fp32
    device: str = "auto"  # auto: cuda when there is one
    seed: int = 0
    log_every: int = 50  # steps between host-device syncs for logging (the only ones in the hot loop)
    eval_every: int = 1  # epochs
    stop_at_step: int = 0  # stop as on SIGTERM (save, exit 0) after this many optimizer steps; 0: never
    # Minutes between mid-epoch checkpoints of last.pt (and at each epoch's end); 0: at epoch ends only. A kill
    # without warning (node failure, OOM kill, spot reclaim: AWS gives 2 minutes, GCP 30 s) loses at most this
    # much training; an ImageNet epoch at batch 64 is 18,016 steps, from minutes on an H200 to hours elsewhere.
    # A checkpoint is taken at a log interval: the training thread copies the state to host memory and a side
    # thread writes it (docs/training.md, "Resume, preemption, failures", has the measured cost).
    checkpoint_every_min: float = 10.0
    objective: str = "supervised"  # a name in training/objectives' registry (OBJECTIVES)
    # An exponential moving average of the weights (timm's ModelEmaV3), updated every step; 0: none. Evaluated
    # beside the raw weights and saved in last.pt; best.pt holds whichever `best_on` names. The average covers
    # about 1 / (1 - decay) steps: 0.9998 is 5,000 steps, a third of an ImageNet epoch at batch 64 (DeiT's
    # 0.99996 at batch 1024 is 20 epochs).
    ema_decay: float = 0.0
    ema_warmup: bool = False  # timm's warmup: the decay grows from 0 toward ema_decay over the first steps
    best_on: str = "raw"  # raw | ema: the weights whose holdout figure picks best.pt


@dataclass
class SSLConfig:
    """SimCLR's settings and the k-NN evaluation of every self-supervised objective (training/objectives/simclr.py,
    training/knn.py)."""
    # SimCLR's NT-Xent temperature. 0.2: MoCo v3's value for ViTs (Chen, Xie & He 2021, "An Empirical Study of
    # Training Self-Supervised Vision Transformers", sec. 4 and appendix); SimCLR used 0.1-0.5 for ResNets.
    temperature: float = 0.2
    # The projection head: Linear(d, proj_hidden_dim)-BN-ReLU-Linear(proj_hidden_dim, proj_dim), SimCLR's
    # 2-layer MLP with MoCo v3's widths (MoCo v3 uses 3 layers of 4096; 2048 keeps the head small).
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    # k-NN on frozen features (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
    # Discrimination"; DINO's eval_knn.py): 20 neighbours, votes weighted by exp(cosine / 0.07).
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: str = "train"  # the split whose features vote (read with eval transforms); queries: data.eval_splits


@dataclass
class MAEConfig:
    """Masked-image reconstruction (training/objectives/mae.py): He et al. 2022, "Masked Autoencoders Are
    Scalable Vision Learners". The defaults are the paper's for ViT-B (sec. 4 and appendix A.1)."""
    mask_ratio: float = 0.75  # the share of patches removed per image; the encoder sees the rest
    decoder_depth: int = 8  # transformer blocks of the decoder
    decoder_width: int = 512
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # each target patch normalized to zero mean and unit variance (the paper's default)


@dataclass
class ColorizeConfig:
    """Colorization (training/objectives/colorize.py): the grayscale image in, its colour (CIELAB a*b* per pixel)
    out."""
    huber_delta: float = 0.1  # of the smooth-L1 loss on a*b* scaled to [-1, 1] (training/objectives/colorize.py)


@dataclass
class RunConfig:
    out: str = "runs"  # parent of the run directories
    name: str = ""  # default: <preset>-<loader>-<UTC time>


@dataclass
class Config:
    preset: str = "vit_b16_seed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    colorize: ColorizeConfig = field(default_factory=ColorizeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# A field's allowed values. train.objective's are the objectives' registry (training/objectives), which checks
# the name when the run builds its objective.
CHOICES = {("data", "loader"): tuple(KINDS),
           ("train", "precision"): ("bf16", "fp16", "fp32"),  # training/precision.py's DTYPES
           ("model", "finetune"): ("full", "linear"),
           ("model", "compile_mode"): COMPILE_MODES,
           ("train", "best_on"): ("raw", "ema")}


def _check(value, kind, where: str):
    """`value` converted to the field's type, or a ConfigError naming the key."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 1 for a float field is fine; "1e-3" from YAML is parsed below
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(section, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"unknown config key '{name}' (known here: {known})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping of its fields, got {value!r}")
            _apply(current, value, name)
            continue
        kind = hints[key]
        kind = typing.get_origin(kind) or kind
        if isinstance(kind, types.UnionType):
            kind = object
        value = _check(value, kind, name)
        allowed = CHOICES.get(tuple(name.split(".")))
        if allowed and value not in allowed:
            raise ConfigError(f"{name}: '{value}' is not one of {', '.join(allowed)}")
        setattr(section, key, value)


def parse_override(text: str) -> dict:
    """'optim.lr=5e-4' -> {'optim': {'lr': 0.0005}}; the value is read as YAML (numbers, lists, true)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not KEY=VALUE (for example optim.lr=5e-4)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_config(preset: str, overrides: list[dict | str] = ()) -> Config:
    path = PRESETS / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{preset}' (presets: {', '.join(preset_names())})")
    config = Config(preset=preset)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    _apply(config, values, "")
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: list[dict | str]) -> Config:
    """'section.field=value' strings or nested mappings, applied in order and checked like a preset."""
    for override in overrides:
        _apply(config, parse_override(override) if isinstance(override, str) else override, "")
    return config


# Fields that configs saved by earlier versions hold and that no longer exist (run.resume, which nothing read):
# dropped when a saved config is read, so that those runs still resume.
RETIRED = (("run", "resume"),)


def config_from_dict(values: dict) -> Config:
    """A resolved config as saved in config.yaml or a checkpoint."""
    values = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in values.items()}
    for section, key in RETIRED:
        if isinstance(values.get(section), dict):
            values[section].pop(key, None)
    config = Config()
    _apply(config, values, "")
    return config


def ramp_of(config: Config):
    """The config's pipelines.contract.Ramp, or None without one."""
    from pipelines.contract import Ramp
    ramp = config.data.ramp
    if not ramp.start_size:
        return None
    return Ramp(start_size=ramp.start_size, end_size=ramp.end_size or config.data.image_size,
                start_epoch=ramp.start_epoch, end_epoch=ramp.end_epoch, step=ramp.step)


def rand_augment_of(config: Config):
    """The config's pipelines.contract.RandAugment, or None when augment.rand_augment is off. Raises ConfigError
    for a spec it cannot read."""
    from pipelines.contract import RandAugment
    try:
        return RandAugment.parse(config.augment.rand_augment)
    except ValueError as e:
        raise ConfigError(f"augment.{e}") from None


def augmentations_on(augment: AugmentConfig, *, batch_only: bool = False) -> list[str]:
    """The names of DeiT's augmentations that `augment` turns on: rand_augment (in the loader, per sample), then
    mixup, cutmix and erasing (on the batch: training/batch_augment.py); `batch_only`: those on the batch."""
    names = ("mixup", "cutmix", "erasing") if batch_only else ("rand_augment", "mixup", "cutmix", "erasing")
    return [name for name in names if getattr(augment, name)]


def check_recipe(config: Config, patch: int | None) -> None:
    """The combinations that cannot work, as ConfigErrors before any work: a resolution ramp that shrinks or
    ends elsewhere than data.image_size, a size the ViT's patch does not divide (`patch`: the model's patch
    side, None for models that take any size), augmentation strengths out of range. What the chosen objective
    rules out (mixup without labels, a ramp for two views) it checks itself (training/objectives, check)."""
    data, augment, ramp = config.data, config.augment, config.data.ramp
    sizes = {"data.image_size": data.image_size}
    if ramp.start_size:
        end = ramp.end_size or data.image_size
        if ramp.end_size and ramp.end_size != data.image_size:
            raise ConfigError(f"data.ramp.end_size {ramp.end_size} must equal data.image_size {data.image_size} "
                              "(the size evaluation runs at), or be 0")
        if end < ramp.start_size:
            raise ConfigError(f"data.ramp: the end size {end} is below the start size {ramp.start_size}; a ramp "
                              "grows (for example start_size=128 with data.image_size=224)")
        if not 0 <= ramp.start_epoch < ramp.end_epoch:
            raise ConfigError(f"data.ramp: start_epoch {ramp.start_epoch} must be below end_epoch {ramp.end_epoch}")
        if ramp.step < 1:
            raise ConfigError(f"data.ramp.step must be positive, got {ramp.step}")
        sizes |= {"data.ramp.start_size": ramp.start_size, "data.ramp.step": ramp.step}
    elif ramp.end_size or ramp.end_epoch:
        raise ConfigError("data.ramp: set start_size to turn the ramp on (its other fields alone do nothing)")
    if patch:
        for name, size in sizes.items():
            if size % patch:
                raise ConfigError(f"{name} {size} is not a multiple of the model's patch size {patch}")
    rand_augment_of(config)
    for name in ("mixup", "cutmix", "erasing", "mix_prob", "switch_prob"):
        value = getattr(augment, name)
        if value < 0 or (name != "mixup" and name != "cutmix" and value > 1):
            raise ConfigError(f"augment.{name} {value} is out of range")
    if (augment.mixup or augment.cutmix) and data.batch_size % 2:
        raise ConfigError(f"augment.mixup/cutmix pair each image with the batch reversed: data.batch_size "
                          f"{data.batch_size} must be even")
    if config.train.best_on == "ema" and not config.train.ema_decay:
        raise ConfigError("train.best_on=ema needs train.ema_decay (for example 0.9998)")
    if not 0 <= config.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay {config.train.ema_decay} must be in [0, 1)")
    for name in ("drop_path_rate", "patch_drop_rate"):
        if not 0 <= getattr(config.model, name) < 1:
            raise ConfigError(f"model.{name} {getattr(config.model, name)} must be in [0, 1)")
