"""The one optimiser set-up of every trained part: AdamW on the trainable parameters, cosine-annealed per step."""

from __future__ import annotations

import torch
from torch import nn


def adamw_cosine(
    module: nn.Module,
    lr: float,
    steps: int,
    min_lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """AdamW over ``module``'s parameters that require grad (frozen parts stay out), and a cosine schedule from
    ``lr`` to ``min(min_lr, lr)`` over ``steps`` scheduler steps (at least one); step it once per optimiser step.

    The fused kernel (one pass over all parameters) where every parameter is a floating-point tensor on the CPU or a
    CUDA device: a tiny CPU model spends a sixth of its step in the per-parameter loop otherwise (8.3 vs 1.4 ms for
    the quickstart restorer's 164 tensors on one core)."""
    params = [p for p in module.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=min(min_lr, lr))
    return opt, sched
