"""`torch.compile` of the decoder layers, only where it repays its compile time.

Each decoder layer is compiled in place (`nn.Module.compile`: parameter names, checkpoints and saved models are
unchanged) with dynamic shapes, so every layer of the model and every sequence length share one compiled graph.
Inductor fuses the element-wise work between the matmuls (RMSNorm, rotary embeddings, the SiLU gate, residual
adds) and keeps fewer activations for the backward pass, recomputing the cheap ones. The matmuls and attention
stay the same kernels. Compiling costs about half a minute per distinct graph on two CPU cores (training passes,
then again for evaluation and for DPO's reference passes, which run without gradients), so `auto` compiles only
runs long enough to win that back. Measured figures: docs/performance.md.
"""

from __future__ import annotations

import shutil

import torch

from alignkit.errors import UserError
from alignkit.models.load import transformers_model

AUTO_MIN_STEPS = 100  # ~30 s per graph against a few percent of each step: break-even after tens of steps


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the classes it names as never to be split across devices."""
    base = transformers_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def why_not(model: torch.nn.Module, device: torch.device, sharded: bool) -> str | None:
    """The reason compiling cannot be used in this run, or None."""
    base = transformers_model(model)
    if sharded:
        return "FSDP or DeepSpeed shards the layers"
    if getattr(base, "is_activation_checkpointing", False):
        return "activation checkpointing recomputes the layers"
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found for inductor's CPU code"
    if device.type not in ("cpu", "cuda"):
        return f"not measured on {device.type}"
    if not decoder_layers(model):
        return f"{type(base).__name__} names no decoder layer class"
    return None


def configure(model: torch.nn.Module, setting: str, total_steps: int, device: torch.device,
              sharded: bool) -> tuple[bool, str]:
    """Compile the decoder layers as `setting` (auto, on, off) says: (compiled?, what was decided for the log)."""
    if setting == "off":
        return False, "off"
    reason = why_not(model, device, sharded)
    if reason is not None:
        if setting == "on":
            raise UserError(f"compile: on is not possible here: {reason}")
        return False, f"off ({reason})"
    if setting == "auto" and total_steps < AUTO_MIN_STEPS:
        return False, f"off ({total_steps} steps < {AUTO_MIN_STEPS}: compiling would cost more than it saves)"
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    embeddings = frozen_input_embeddings(model)
    if embeddings is not None:
        # Under LoRA the first layer's input would need no gradient, which gets that layer a training graph of its
        # own: one compile more, and in bf16 its kernels round differently from the no-grad graph of DPO's
        # reference pass, so policy and reference log-probs differed by up to ~2 nats per sequence at step 1
        # (loss 0.686, not log 2). Marked as needing a gradient, every layer runs the one training graph. Only
        # while gradients are on: a no-grad pass marked so would compile its first layer apart instead.
        embeddings.register_forward_hook(_needs_gradient)
    return True, f"{len(layers)} decoder layers (compiled during the first steps)"


def frozen_input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """The input embedding module when it stays frozen while other weights train (LoRA, adapters); else None."""
    try:
        embeddings = transformers_model(model).get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        return None
    return embeddings if any(p.requires_grad for p in model.parameters()) else None


def _needs_gradient(module: torch.nn.Module, args, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        output.requires_grad_(True)
