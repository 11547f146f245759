"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_ratio`` of the peak."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine", "warmup_steps", "make_scheduler"]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """The multiplier of the peak learning rate at each step."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``--warmup``: a step count, or below 1 a fraction of all steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def make_scheduler(optimizer, total_steps: int, warmup: float, min_ratio: float):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps(warmup, total_steps), min_ratio))
