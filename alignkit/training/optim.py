"""AdamW with decoupled weight decay on matrices only, and the lr schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Biases and norm gains (1-D) are not decayed: shrinking them towards 0 only hurts.
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # The fused kernel updates each tensor in one pass, without the multi-tensor path's full-size temporaries:
    # on SmolLM2-135M (CPU) a step 5x faster and 240 MB less at the step (docs/performance.md).
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * total_steps)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
