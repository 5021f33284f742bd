"""Transfer: start a run from another run's backbone (--init), fine-tune all of it, some of it, or only a linear
classifier on top of it (--finetune linear: a linear probe).

Any of this trainer's checkpoints works: a supervised one (the timm model, head included), a simclr or rotation
one (the backbone under timm's names; the objective's head or decoder under "objective_head", which is dropped
here). The new classification head is sized from the target data's manifest: a checkpoint head of another
shape is dropped, and the message names its keys. Any other key that is missing or unexpected, or of another
shape, is an error: it means another architecture (model.name, model.kwargs or the image size differ).
"""
from __future__ import annotations


import torch
from torch import nn

from . import checkpoint
from .config import Config, ConfigError


class TransferError(ConfigError):
    """A checkpoint that does not fit the model, or freezing that the model does not allow."""


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The key prefixes of a timm model's classifier ('head.' for ViTs, 'fc.' for ResNets)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def load_backbone(model: nn.Module, init: str, say) -> dict:
    """Loads the backbone weights of checkpoint `init` into the timm model `model`, keeping `model`'s own
    (freshly initialized) classifier unless the checkpoint's has the same shape. Returns what was dropped."""
    path = checkpoint.find(init, "--init", (checkpoint.BEST, checkpoint.LAST))
    try:
        saved = checkpoint.load(path)
    except Exception as e:  # pickle, zip or weights_only errors: all mean "not one of our checkpoints"
        raise TransferError(f"--init {path}: not a checkpoint torch can load ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise TransferError(f"--init {path}: not a checkpoint of training/run.py (it has no 'model' entry)")
    source, target = saved["model"], model.state_dict()
    heads = classifier_prefixes(model)
    is_head = lambda key: key.startswith(heads)  # noqa: E731
    dropped = [k for k in source if is_head(k) and (k not in target or source[k].shape != target[k].shape)]
    if dropped:
        ours = ", ".join(f"{k} {list(v.shape)}" for k, v in target.items() if is_head(k)) or "none"
        say(f"--init: dropped the checkpoint's classifier {', '.join(f'{k} {list(source[k].shape)}' for k in dropped)}"
            f": it does not fit this model's ({ours}); the new head is trained from scratch")
    weights = {k: v for k, v in source.items() if k not in dropped}
    missing = [k for k in target if k not in weights and not is_head(k)]
    unexpected = [k for k in weights if k not in target]
    reshaped = [f"{k} {list(weights[k].shape)} -> {list(target[k].shape)}" for k in weights
                if k in target and weights[k].shape != target[k].shape]
    if missing or unexpected or reshaped:
        model_config = saved.get("config", {}).get("model", {})
        problems = "; ".join(f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                             for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("other shape", reshaped)) if keys)
        raise TransferError(f"--init {path} does not fit this model ({problems}). The checkpoint was trained as "
                            f"{model_config.get('name')} with kwargs {model_config.get('kwargs')} at "
                            f"{saved.get('config', {}).get('data', {}).get('image_size')} px: pass the same "
                            "--model, --set model.kwargs=... and --image-size")
    model.load_state_dict(weights, strict=False)  # only the classifier may be left out (checked above)
    new_head = [k for k in target if is_head(k) and k not in weights]
    objective = saved.get("config", {}).get("train", {}).get("objective", "supervised")
    extra = [f"objective_head.{k}" for k in saved.get("objective_head") or {}]
    say(f"--init: loaded {len(weights)} tensors from {path} ({objective} run)"
        + (f"; dropped its {objective} head ({', '.join(extra)})" if extra else "")
        + (f"; new classifier: {', '.join(new_head)}" if new_head else ""))
    return {"dropped": dropped + extra, "new": new_head, "path": str(path)}


def freeze(model: nn.Module, config: Config, *, supervised: bool = True) -> list[nn.Module]:
    """Freezes what model.finetune and model.freeze_blocks ask for, on the timm model `model`. Returns the frozen
    submodules: the loop keeps them in eval mode (no dropout, drop-path or BN statistics drifting). The optimizer
    is built afterwards and only gets the parameters that still require gradients. `supervised`: whether the
    run's objective trains a classifier on the labels (Objective.supervised), the only one freezing applies to."""
    finetune, blocks = config.model.finetune, config.model.freeze_blocks
    if (finetune == "linear" or blocks) and not supervised:
        raise TransferError(f"model.finetune=linear and model.freeze_blocks apply to the supervised objective, "
                            f"not to {config.train.objective}")
    if finetune == "linear":
        if blocks:
            raise TransferError("model.freeze_blocks has no effect with model.finetune=linear (it freezes the "
                                "whole backbone already); drop one of them")
        heads = {prefix.rstrip(".") for prefix in classifier_prefixes(model)}
        frozen = [module for name, module in model.named_children() if name not in heads]
        for param in model.parameters():
            param.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        return frozen
    if blocks == 0:
        return []
    depth = len(getattr(model, "blocks", ()))
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise TransferError(f"model.freeze_blocks needs a ViT-like model with .patch_embed and .blocks; "
                            f"{config.model.name} has none")
    if not 0 < blocks <= depth:
        raise TransferError(f"model.freeze_blocks={blocks}, but {config.model.name} has {depth} blocks "
                            f"(0 to {depth})")
    # The embedding: the patch projection, and the position embedding and class/register tokens added to it.
    frozen = [model.patch_embed, *model.blocks[:blocks]]
    for module in frozen:
        module.requires_grad_(False)
    for name in ("cls_token", "reg_token", "pos_embed"):
        param = getattr(model, name, None)
        if isinstance(param, torch.nn.Parameter):
            param.requires_grad_(False)
    return frozen
