"""The KTO loss: a pure function of sequence log-probabilities of unpaired, labelled completions.

Notation, for a row (x, y) with a binary label (desirable or undesirable):
  r(x, y) = ℓθ(y|x) − ℓref(y|x), the log-ratio of the completion's summed log-probabilities
  z_ref   = max(0, mean over mismatched pairs (x_i, y_j), j ≠ i, of ℓθ(y_j|x_i) − ℓref(y_j|x_i)),
            an estimate of KL(πθ ‖ πref) used as the reference point; no gradient flows through it.
"""

from __future__ import annotations

import torch


def reference_point(kl_sum: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """z_ref = max(0, Σ (ℓθ − ℓref) over the mismatched pairs / their number), detached (the paper, §4.1)."""
    return (kl_sum.detach() / max(float(count), 1.0)).clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z_ref: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row KTO loss:  λ_D (1 − σ(β(r − z_ref)))  for a desirable row,  λ_U (1 − σ(β(z_ref − r)))  else.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306, Eq. 8
    (the value v(x, y) of Eq. 6 subtracted from λ_y). λ_D and λ_U weigh desirable against undesirable rows;
    the paper suggests λ_D n_D / (λ_U n_U) in [1, 4/3].
    """
    logratio = policy_logps - ref_logps
    value = torch.where(desirable, torch.sigmoid(beta * (logratio - z_ref)), torch.sigmoid(beta * (z_ref - logratio)))
    weight = torch.full_like(value, undesirable_weight).masked_fill(desirable, desirable_weight)
    return weight * (1 - value)
