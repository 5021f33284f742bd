"""train.precision's meaning: the dtype loaders hand over batches in and the autocast each forward runs under.

bf16 and fp16 autocast the forward (matmuls and convolutions in half precision, reductions in float32); fp16
also scales the loss (torch.amp.GradScaler, run.py): its 5-bit exponent underflows small gradients. fp32 runs
without autocast.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A function returning a fresh autocast context for `precision` (a null one for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])
