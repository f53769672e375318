"""The SFT loss: token-level cross-entropy on the trained (completion / assistant) tokens."""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """L = −(1/N) Σ_t mask_t · log π(y_t | y_<t, x)

    N is the number of trained tokens in the whole optimizer step (all micro-batches of the accumulated batch,
    all processes), not in this micro-batch: every trained token weighs the same, whatever the length of its
    sequence. A mean of per-sequence means would instead give short completions more weight per token.
    Summing this loss over the step's micro-batches gives the mean token NLL of the step.
    """
    return -(token_logps * mask).sum() / num_tokens
