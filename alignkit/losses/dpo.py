"""The preference-loss family: pure functions of sequence log-probabilities, one value per pair.

Notation, for a pair (x, y_c, y_r) of a prompt with a chosen and a rejected completion:
  ℓθ(y|x)  = Σ_t log πθ(y_t | x, y_<t) over the completion's tokens (end-of-turn token included)
  ℓref(y|x) the same under the frozen reference model, |y| the number of completion tokens
  Δ        = (ℓθ(y_c) − ℓref(y_c)) − (ℓθ(y_r) − ℓref(y_r))
The implicit reward of a completion is β(ℓθ(y) − ℓref(y)) (DPO paper, §5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: −log σ(βΔ).  Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, Eq. 7.

    With label smoothing ε (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"):
    −(1−ε) log σ(βΔ) − ε log σ(−βΔ), the expected loss when a fraction ε of the labels is flipped.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε).

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", arXiv 2403.00409:
    an unbiased estimate of the clean-label loss when a fraction ε of the labels is flipped.
    """
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (Δ_c/|y_c| − Δ_r/|y_r| − 1/(2β))², with Δ_y = ℓθ(y) − ℓref(y) averaged per token.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv 2310.12036, Eq. 17 (β plays the role of τ); the per-token average keeps β comparable across lengths.
    """
    per_token = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (per_token - 1 / (2 * beta)) ** 2


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge: max(0, 1 − βΔ).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv 2305.10425, with the
    reference-normalised margin as in Liu et al. 2023 (RSO, arXiv 2309.06657).
    """
    return torch.relu(1 - beta * delta)


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (reference-free): −log σ(β(ℓθ(y_c)/|y_c| − ℓθ(y_r)/|y_r|) − γ).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734,
    Eq. 6; γ is the target reward margin.
    """
    margin = chosen_logps / chosen_lengths.clamp(min=1) - rejected_logps / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma)


def pair_losses(loss_types: list[str], beta: float, label_smoothing: float, simpo_gamma: float,
                policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Each requested pair-level loss, one value per pair (`sft` is token-level: see `losses.sft.mean_nll`)."""
    chosen_logratios, rejected_logratios = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    losses = {}
    for kind in loss_types:
        if kind == "sigmoid":
            losses[kind] = sigmoid_loss(delta, beta, label_smoothing)
        elif kind == "robust":
            losses[kind] = robust_loss(delta, beta, label_smoothing)
        elif kind == "ipo":
            losses[kind] = ipo_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta)
        elif kind == "hinge":
            losses[kind] = hinge_loss(delta, beta)
        elif kind == "simpo":
            losses[kind] = simpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta,
                                      simpo_gamma)
        elif kind != "sft":
            raise ValueError(f"unknown loss type {kind!r}")
    return losses
