"""ORPO's odds-ratio term: a pure function of per-token mean log-probabilities, one value per pair."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, computed on the side of −log 2 where it loses no precision (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y|x) = log p − log(1 − p), with p = exp((1/|y|) Σ_t log πθ(y_t | x, y_<t))."""
    return mean_logps - log1mexp(mean_logps)


def odds_ratio_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_OR = −log σ(log odds(y_c|x) − log odds(y_r|x)) per pair, and the log odds ratio inside it.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691,
    Eq. 7; the full objective (Eq. 6) is L_SFT + λ · L_OR, with L_SFT the NLL of the chosen completion.
    """
    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    return -F.logsigmoid(ratio), ratio
