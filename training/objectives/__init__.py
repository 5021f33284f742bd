"""What a training step minimizes: an objective, and the registry the config, the trainer and the benchmarks ask.

An objective (base.Objective) declares everything the rest of the trainer needs: how many views its batches hold,
whether it trains on the labels, the network it trains around a timm backbone, its per-step hook, its own state
(saved in checkpoints), the figure that picks best.pt, how its backbone is handed to k-NN, the linear probe and
fine-tuning, and the pictures evaluation draws. training/loop.py and training/run.py only ask those questions,
never an objective's name, so adding an objective is its module here (registered below, or with `register` from
anywhere) plus, if it has settings, a section of training/config.py.

- supervised: cross-entropy on the labels (supervised.py)
- simclr: SimCLR's NT-Xent on two views (simclr.py)
- rotation: predict a 0/90/180/270-degree rotation (rotation.py)
- mae: masked-image reconstruction, a masked autoencoder (mae.py)
- colorize: predict an image's colours from its luminance (colorize.py)
"""
from __future__ import annotations

from ..config import Config, ConfigError
from .base import (Objective, SSLModel, backbone_of, checkpoint_weights, load_checkpoint_weights,  # noqa: F401
                   pooled_features)
from .colorize import Colorize
from .mae import MAE
from .rotation import Rotation, rotate  # noqa: F401
from .simclr import SimCLR, info_nce  # noqa: F401
from .supervised import Supervised

# train.objective's values, in the order help texts list them.
OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Adds an objective under its `name` (usable as a class decorator). A name taken by another class is an
    error: two objectives answering to one name would make a checkpoint's config ambiguous."""
    if OBJECTIVES.get(cls.name, cls) is not cls:
        raise ValueError(f"an objective named '{cls.name}' is registered already ({OBJECTIVES[cls.name].__name__})")
    OBJECTIVES[cls.name] = cls
    return cls


for _cls in (Supervised, SimCLR, Rotation, MAE, Colorize):
    register(_cls)


def objective_class(name: str) -> type[Objective]:
    """The registered objective `name`, or a ConfigError listing the names."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"train.objective: '{name}' is not one of {', '.join(OBJECTIVES)}") from None


def check(config: Config) -> None:
    """The chosen objective's rules for the rest of the config (Objective.check), as ConfigErrors before any
    work."""
    objective_class(config.train.objective).check(config)


def build_objective(config: Config, num_classes: int = 0) -> Objective:
    """train.objective's Objective with its settings. `num_classes`: the dataset's (mixup's soft targets)."""
    return objective_class(config.train.objective).from_config(config, num_classes)


def build_network(config: Config, objective: Objective, num_classes: int, *, sync_bn: bool = False):
    """The module a run trains (Objective.network)."""
    return objective.network(config, num_classes, sync_bn=sync_bn)
