"""Per-token log-probabilities of the labels under a model's logits: a pure function of the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.data.tokenize import IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(label_{t+1} | tokens ≤ t) for every position, and the mask of positions that are trained.

    logits: [B, T, V] (any float dtype), labels: [B, T] with IGNORE where untrained. Returns two [B, T-1]
    tensors: float32 log-probs (0 where masked) and a bool mask. The float32 log-softmax is taken a few rows
    at a time so a full [B, T, V] float32 copy never exists at once.
    """
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE
    targets = shifted_labels.masked_fill(~mask, 0)
    pieces = []
    for start in range(0, logits.shape[0], chunk_rows):
        rows = logits[start:start + chunk_rows, :-1].float()
        nll = F.cross_entropy(rows.transpose(1, 2), targets[start:start + chunk_rows], reduction="none")
        pieces.append(-nll)
    logps = torch.cat(pieces, dim=0)
    return logps * mask, mask
