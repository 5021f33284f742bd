"""AdamW and the cosine schedule with linear warmup, both from timm, stepped per optimizer step."""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from .config import ConfigError, OptimConfig


def check_fused(config: OptimConfig, device: torch.device) -> None:
    """optim.fused on a device that torch has no fused AdamW kernel for is a ConfigError now, not a RuntimeError
    at the first optimizer step (where torch's AdamW checks it)."""
    supported = _get_fused_kernels_supported_devices()
    if config.fused and torch.device(device).type not in supported:
        raise ConfigError(f"optim.fused=true: torch has no fused AdamW for '{torch.device(device).type}' devices "
                          f"(only {', '.join(supported)}); set optim.fused=false")


def uses_fused(config: OptimConfig, device: torch.device, *, loss_scaling: bool) -> bool:
    """optim.fused, and always under fp16's loss scaling on a GPU: GradScaler.step reads its found-inf flag back
    to the host (`.item()`, a sync every step) before an optimizer that cannot take it, torch's foreach and
    for-loop AdamW; the fused AdamW takes the flag and the scale as device tensors and skips the update there."""
    return config.fused or (loss_scaling and torch.device(device).type == "cuda")


def build_optimizer(model: torch.nn.Module, config: OptimConfig, *, loss_scaling: bool = False) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients, on the device they are on (build it after .to(device)).
    `loss_scaling`: the step runs under an enabled GradScaler (fp16), see uses_fused."""
    device = next(p.device for p in model.parameters())
    check_fused(config, device)
    # fused=True: one kernel for the whole update; left out, torch picks its default for the device
    implementation = {"fused": True} if uses_fused(config, device, loss_scaling=loss_scaling) else {}
    # filter_bias_and_bn: no weight decay on biases, norm weights, the position embedding and the class token
    # (timm's and DeiT's practice; decaying a LayerNorm gain toward 0 only fights the optimizer).
    return create_optimizer_v2(model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay,
                               betas=tuple(config.betas), filter_bias_and_bn=True, **implementation)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, *, steps_per_epoch: int,
                    epochs: int) -> CosineLRScheduler:
    """Linear warmup over `warmup_epochs`, then a cosine from lr to min_lr that ends at the last step."""
    total = steps_per_epoch * epochs
    warmup = min(round(config.warmup_epochs * steps_per_epoch), max(total - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=config.min_lr, warmup_t=warmup,
                             warmup_lr_init=config.lr * 1e-3, warmup_prefix=True, t_in_epochs=False)
