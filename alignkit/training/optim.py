"""AdamW with decoupled weight decay on matrices only, and the lr schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    loraplus_lr_ratio: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with `loraplus_lr_ratio` ≠ 1 the LoRA B matrices form their own
    groups at lr × ratio (LoRA+, Hayou et al. 2024, arXiv 2402.12354: B, initialised at 0, should learn faster
    than A). The first group is always at the base lr, which is what the metrics log as `lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    faster = loraplus_lr_ratio != 1.0
    groups = []
    for is_b in (False, True) if faster else (False,):
        params = [p for n, p in named if not faster or ("lora_B" in n) == is_b]
        scale = {"lr": lr * loraplus_lr_ratio} if is_b else {}
        # Biases and norm gains (1-D) are not decayed: shrinking them towards 0 only hurts.
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **scale},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **scale}]
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
