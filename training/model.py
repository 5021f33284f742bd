"""The model: any timm architecture, from scratch, with the manifest's number of classes."""
from __future__ import annotations

import torch

from .config import ConfigError, ModelConfig


def create_model(config: ModelConfig, num_classes: int, image_size: int) -> torch.nn.Module:
    """timm's model with its own state-dict key names, so `timm.create_model(name, num_classes=N)` loads our
    checkpoints. Models that take an input size (ViTs: the position embedding has one entry per patch) get
    the data's; the others (ResNets) work at any size."""
    import timm
    kwargs = dict(config.kwargs)
    if "img_size" not in kwargs:
        try:
            return timm.create_model(config.name, pretrained=False, num_classes=num_classes, img_size=image_size,
                                     **kwargs)
        except TypeError:  # the architecture has no img_size argument
            pass
    return timm.create_model(config.name, pretrained=False, num_classes=num_classes, **kwargs)


def check(config: ModelConfig, image_size: int) -> None:
    """Builds the model on the meta device (no memory, about 0.2 s for ViT-B/16) so that an unknown model.name
    or a model.kwargs key its constructor does not take is a ConfigError before the run starts; the message
    lists the keys the constructor does take."""
    import inspect

    import timm
    if not timm.is_model(config.name):
        raise ConfigError(f"model.name: timm has no model '{config.name}' (timm.list_models() lists them)")
    try:
        with torch.device("meta"):
            create_model(config, num_classes=2, image_size=image_size)
    except (RuntimeError, ValueError, AssertionError, NotImplementedError):
        return  # not a key mistake; some models' init code needs real tensors: the real build reports it
    except TypeError as e:
        if "keyword argument" not in str(e):  # some other TypeError: the real build reports it
            return
        with torch.device("meta"):
            plain = timm.create_model(config.name, pretrained=False)
        taken = [name for name in inspect.signature(type(plain).__init__).parameters
                 if name not in ("self", "args", "kwargs", "device", "dtype", "num_classes")]
        raise ConfigError(f"model.kwargs {config.kwargs} do not fit {config.name} ({e}); "
                          f"{type(plain).__name__} takes: {', '.join(taken)}") from None
