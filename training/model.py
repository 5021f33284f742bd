"""The model: any timm architecture, from scratch, with the manifest's number of classes."""
from __future__ import annotations

import torch

from .config import ConfigError, ModelConfig


def create_model(config: ModelConfig, num_classes: int, image_size: int, *,
                 dynamic_size: bool = False) -> torch.nn.Module:
    """timm's model with its own state-dict key names, so `timm.create_model(name, num_classes=N)` loads our
    checkpoints. Models that take an input size (ViTs: the position embedding has one entry per patch) get
    the data's; the others (ResNets) work at any size. `dynamic_size` (a resolution ramp): timm's
    dynamic_img_size, the ViT's position embedding interpolated to each batch's grid, so one model trains at
    every size of the ramp while its weights keep image_size's shapes (a checkpoint loads at image_size)."""
    import timm
    kwargs = dict(config.kwargs)
    kwargs |= {name: getattr(config, name) for name in ("drop_path_rate", "patch_drop_rate") if getattr(config, name)}
    if dynamic_size:
        kwargs["dynamic_img_size"] = True
    if "img_size" not in kwargs:
        try:
            return timm.create_model(config.name, pretrained=False, num_classes=num_classes, img_size=image_size,
                                     **kwargs)
        except TypeError:  # the architecture has no img_size argument
            pass
    return timm.create_model(config.name, pretrained=False, num_classes=num_classes, **kwargs)


def check(config: ModelConfig, image_size: int, *, dynamic_size: bool = False) -> int | None:
    """Builds the model on the meta device (no memory, about 0.2 s for ViT-B/16) so that an unknown model.name
    or a model.kwargs key its constructor does not take is a ConfigError before the run starts; the message
    lists the keys the constructor does take. Returns the model's patch side (None: no patch embedding)."""
    import inspect

    import timm
    if not timm.is_model(config.name):
        raise ConfigError(f"model.name: timm has no model '{config.name}' (timm.list_models() lists them)")
    try:
        with torch.device("meta"):
            model = create_model(config, num_classes=2, image_size=image_size, dynamic_size=dynamic_size)
    except (RuntimeError, ValueError, AssertionError, NotImplementedError):
        return None  # not a key mistake; some models' init code needs real tensors: the real build reports it
    except TypeError as e:
        if "keyword argument" not in str(e):  # some other TypeError: the real build reports it
            return None
        with torch.device("meta"):
            plain = timm.create_model(config.name, pretrained=False)
        taken = [name for name in inspect.signature(type(plain).__init__).parameters
                 if name not in ("self", "args", "kwargs", "device", "dtype", "num_classes")]
        raise ConfigError(f"model.kwargs {config.kwargs} do not fit {config.name} ({e}); "
                          f"{type(plain).__name__} takes: {', '.join(taken)}") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if isinstance(patch, (tuple, list)) else patch
