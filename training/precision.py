"""Mixed precision: which autocast a run uses, and its gradient scaler."""

from __future__ import annotations

import contextlib

__all__ = ["resolve_precision", "autocast", "grad_scaler"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(device) -> str:
    """``--precision auto``: bf16 autocast on a CUDA device that supports it, fp32 elsewhere."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device, precision: str):
    """The forward's autocast context (none for fp32)."""
    import torch

    name = _DTYPES.get(precision)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, name))


def grad_scaler(device, precision: str):
    """A GradScaler, enabled for fp16 only (bf16 and fp32 need none)."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
