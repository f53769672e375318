"""The SFT loss: token-level cross-entropy on the trained (completion / assistant) tokens."""

from __future__ import annotations

import torch


def mean_nll(logps: torch.Tensor, num_tokens: int | float | torch.Tensor) -> torch.Tensor:
    """L = −(1/N) Σ log π(y_t | y_<t, x), summed over the trained tokens whose log-probs (or per-sequence sums of
    them) `logps` holds; untrained positions hold 0.

    N is the number of trained tokens in the whole optimizer step (all micro-batches of the accumulated batch,
    all processes), not in this micro-batch: every trained token weighs the same, whatever the length of its
    sequence (a mean of per-sequence means would give short completions more weight per token), and summing
    this loss over the step's micro-batches gives the mean token NLL of the step.

    SFT trains on it alone; DPO's `sft` term is the same over the chosen completions (RPO: Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", arXiv 2404.19733), which keeps their likelihood from falling
    while the margin grows.
    """
    return -logps.sum() / num_tokens
