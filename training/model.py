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


# Graphs one process may compile for the model's forward, beyond the train sizes: evaluation's (eval mode, no
# gradients: other guards) for full batches and for the last, smaller one, for the raw weights and the EMA's.
EVAL_GRAPHS = 4


def _raise_recompile_limit(graphs: int) -> None:
    """torch's limit of graphs per function (8; every compiled twin of one module class shares its forward's
    entry) raised to `graphs`, so that planned graphs never fall back to eager mode."""
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), graphs))


def compile_for_training(module: torch.nn.Module, config: ModelConfig, *, sizes: int = 1,
                         backend: str = "inductor") -> torch.nn.Module:
    """torch.compile in model.compile_mode, or the module itself when model.compile is false. dynamic=False:
    every training batch has one shape (train loaders drop the last partial batch), so the graph is specialized
    to it, and a second shape in the same process (the benchmark's next batch size) compiles a graph of its own
    instead of a dynamic-shape one. The CUDA-graph modes copy each step's input batch into the graph's static
    buffer (one copy of 19 MB for 64 bf16 images at 224 px).

    `sizes`: the image sizes a resolution ramp trains at. Each gets its graph once, on its first batch (the ramp
    is monotonic, so no size comes back after the next one took over); torch's limit of recompiles per function
    (8) is raised to fit, so that a long ramp never falls back to eager mode."""
    if not config.compile:
        return module
    _raise_recompile_limit(sizes + 1 + EVAL_GRAPHS)
    return torch.compile(module, mode=config.compile_mode, dynamic=False, backend=backend)


def compile_for_evaluation(module: torch.nn.Module, config: ModelConfig, *,
                           backend: str = "inductor") -> torch.nn.Module:
    """What evaluation runs: `module` compiled (model.compile and model.compile_eval both true), or `module`
    itself. Never the training module: DDP's forward broadcasts buffers (a collective per batch, and ranks hold
    different numbers of eval batches), and the training graph is specialized to training mode and gradients.
    dynamic=None: the full batches get one static graph, and the last, smaller batch a graph with a dynamic batch
    size (torch marks the dimension dynamic at its second shape), not one graph per remainder. Whether compiling
    pays for itself over a run depends on the evaluation's share of the work: docs/training.md, "Evaluation"."""
    if not (config.compile and config.compile_eval):
        return module
    _raise_recompile_limit(8 + EVAL_GRAPHS)
    return torch.compile(module, mode=config.compile_mode, dynamic=None, backend=backend)
