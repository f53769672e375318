"""Sequence-level KL(π‖π_ref), estimated on samples drawn from π.

KL(π‖π_ref)(x) = E_{y∼π(·|x)} [log π(y|x) − log π_ref(y|x)], and with y drawn from π (temperature 1, no
top-p/top-k truncation) the mean over samples of Σ_t [log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)] over the
generated tokens is an unbiased estimate. The DPO paper's Figure 2 plots reward against this quantity.
"""

from __future__ import annotations

import torch

from alignkit.data.packing import padded
from alignkit.data.tokenize import IGNORE, TokenizedRow
from alignkit.generation import Sample
from alignkit.training.forward import unit_sequence_logps


@torch.no_grad()
def completion_logps(model, samples: list[Sample], pad_id: int, batch_size: int = 16) -> list[float]:
    """Σ_t log π(y_t | x, y_<t) over each sample's generated tokens."""
    model.eval()
    device = next(model.parameters()).device
    rows = [TokenizedRow(s.prompt_ids + s.completion_ids, [IGNORE] * len(s.prompt_ids) + s.completion_ids, "")
            for s in samples]
    sums: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        logps, _ = unit_sequence_logps(model, padded(chunk, pad_id).to(device), len(chunk))
        sums += logps.tolist()
    return sums


def sequence_kl(policy_logps: list[float], reference_logps: list[float]) -> float:
    """Mean over samples of log π(y|x) − log π_ref(y|x)."""
    if not policy_logps:
        return 0.0
    return sum(p - r for p, r in zip(policy_logps, reference_logps, strict=True)) / len(policy_logps)
