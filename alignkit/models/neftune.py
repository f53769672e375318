"""NEFTune: noisy input embeddings for instruction fine-tuning (Jain et al. 2023, arXiv 2310.05914, Algorithm 1).

While the model trains, each forward pass's input embeddings X ∈ R^{B×L×d} get uniform noise
ε ~ U(−1, 1)·α/√(L·d) added, L the pass's sequence length and d the embedding width; in eval mode (evaluation,
generation) the embeddings are left alone. Done by a forward hook on the input-embedding module, as transformers
does it for TRL, so every layout and wrapper sees the same noise rule.
"""

from __future__ import annotations

import math

import torch

from alignkit.models.load import transformers_model


def add_noise(module: torch.nn.Module, _inputs, output: torch.Tensor, alpha: float) -> torch.Tensor:
    if not module.training:
        return output
    scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
    return output + torch.empty_like(output).uniform_(-scale, scale)


def attach(model: torch.nn.Module, alpha: float):
    """Noise on `model`'s input embeddings while it trains; returns the hook's handle (`.remove()` ends it)."""
    embeddings = transformers_model(model).get_input_embeddings()
    return embeddings.register_forward_hook(lambda module, inputs, output: add_noise(module, inputs, output, alpha))
