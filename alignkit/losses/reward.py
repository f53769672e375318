"""The reward-model loss: a pure function of the scalar rewards of each pair's chosen and rejected sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """−log σ(r_c − r_r − m) + λ·(r_c + r_r)², one value per pair.

    r_c = r(x, y_c), r_r = r(x, y_r) are the rewards of the chosen and the rejected sequence. The first term is the
    Bradley–Terry negative log-likelihood of the preference, Ouyang et al. 2022, "Training language models to
    follow instructions with human feedback" (InstructGPT), arXiv 2203.02155, Eq. 1; m is an optional per-pair
    margin (the chosen reward must beat the rejected one by m; Llama 2, Touvron et al. 2023, arXiv 2307.09288,
    Eq. 2). The second term, λ ≥ 0, pulls the rewards towards zero mean, which the Bradley–Terry loss alone leaves
    free: Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking", arXiv 2312.09244, §3.
    """
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss
