"""Activation recomputation (transformers' "gradient checkpointing") only when memory requires it.

Checkpointing a decoder layer keeps only its input for the backward pass and recomputes the rest: about a
third more compute for the checkpointed layers. `auto` estimates what training still has to allocate once the
model is loaded: gradients and AdamW's two moments (4 + 8 bytes per trained parameter), what else the recipe
still loads (DPO's frozen reference copy), on a GPU the weights still to be moved there, the activations of
the largest forward pass (34 bytes per token, hidden unit and layer in 16-bit, twice that in fp32: Korthikanti
et al. 2022, arXiv 2205.05198, without the attention-score term that fused attention never stores) and the
output head's chunk of fp32 logits (`models.logprobs.head_chunk` positions at a time). It compares that with
the memory free on the device (CUDA's free memory, or MemAvailable on the CPU) less a 10% margin. When the
activations do not fit, it checkpoints every n-th layer for the largest n that fits, every layer at worst.
"""

from __future__ import annotations

import torch

from alignkit.errors import UserError
from alignkit.models.load import transformers_model
from alignkit.models.logprobs import head_chunk
from alignkit.training.memory_plan import ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER

MARGIN = 0.9


def free_memory(device: torch.device) -> float:
    """Bytes the run may still allocate on `device`."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")  # no way to tell: do not slow the run down on a guess


def layers_and_width(model) -> tuple[int, int]:
    config = model.config
    return int(getattr(config, "num_hidden_layers", 1)), int(getattr(config, "hidden_size", 1))


def every_n_layers(state_bytes: float, activation_bytes: float, free: float, layers: int = 8) -> int | None:
    """None when everything fits without checkpointing; else n for checkpointing every n-th layer (1: all)."""
    budget = MARGIN * free - state_bytes
    if activation_bytes <= budget:
        return None
    # checkpointing one layer in n keeps (1 - 1/n) of the activations
    for n in range(min(8, layers), 1, -1):
        if activation_bytes * (1 - 1 / n) <= budget:
            return n
    return 1


def configure(model, setting: str, longest_forward_tokens: int, device: torch.device, half: bool,
              extra_bytes: float = 0.0) -> str:
    """Turn checkpointing on as `setting` (auto, on, off) says; returns what was decided, for the log."""
    base = transformers_model(model)
    if setting == "off":
        return "off"
    if not getattr(base, "supports_gradient_checkpointing", False):
        if setting == "on":
            raise UserError(f"activation_checkpointing: {type(base).__name__} does not support it")
        return f"off ({type(base).__name__} does not support it)"
    if setting == "on":
        n = 1
    else:
        layers, width = layers_and_width(base)
        params = list(model.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        # on a GPU the weights are still on the CPU here: they will take device memory too
        weights = sum(p.numel() * p.element_size() for p in params) if params[0].device.type != device.type else 0
        vocab = int(getattr(base.config, "vocab_size", 0))
        head = 3 * 4 * head_chunk(vocab) * vocab  # fp32 logits, softmax and gradient of one chunk
        per_token = ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER * (1 if half else 2) * width * layers
        activations = per_token * longest_forward_tokens + head
        n = every_n_layers(12.0 * trained + weights + extra_bytes, activations, free_memory(device), layers)
        if n is None:
            return "off (activations fit in memory)"
    base.activation_checkpointing_enable(every_n_layers=n)
    return "every layer" if n == 1 else f"every {n}th layer"
