"""The optimiser: AdamW over parameter groups without weight decay on norms, biases and scales."""

from __future__ import annotations

__all__ = ["param_groups", "make_adamw", "make_optimizer"]


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: with weight decay, and without it (1-D parameters,
    biases, norms, the logit scale/bias, the CLS token and the channel embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "logit_" in name or "norm" in name.lower() \
                or ".ln" in name or "ln_" in name or "cls_token" in name or "channel_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _with_text_lr(groups: list[dict], model, text_lr: float) -> list[dict]:
    """Each group split into its non-text and text-encoder parameters, the latter at ``text_lr``."""
    text_ids = {id(p) for p in model.text.parameters()}
    out = []
    for g in groups:
        for is_text in (False, True):
            ps = [p for p in g["params"] if (id(p) in text_ids) == is_text]
            if ps:
                out.append({**g, "params": ps, **({"lr": text_lr} if is_text else {})})
    return out


def make_adamw(groups, device, **kw):
    """AdamW with the fused kernel where torch has one for ``device`` (CUDA, and CPU since torch
    2.4), else the default (foreach) implementation -> (optimizer, "fused" | "foreach")."""
    import torch

    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        fused_ok = device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: fused is CUDA-only
        fused_ok = device.type == "cuda"
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kw), "foreach"


def make_optimizer(model, cfg, device):
    """The optimiser of a fit config -> (optimizer, implementation name)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.text_lr:
        groups = _with_text_lr(groups, model, cfg.text_lr)
    return make_adamw(groups, device, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
