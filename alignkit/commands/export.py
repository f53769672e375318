"""`alignkit export RUN/final --output DIR`: a standalone model folder, LoRA merged and checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignkit.errors import RunError, UserError
from alignkit.models.embedded import log
from alignkit.models.load import load_adapter_model, load_tokenizer


def merged_matches_adapter(adapter_model, merged, tokenizer) -> float:
    """Largest logit difference between the adapter model and the merged one on a probe sentence."""
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return (adapter_model(**probe).logits - merged(**probe).logits).abs().max().item()


def run(cfg) -> Path:
    from transformers import AutoModelForCausalLM

    if not cfg.model or not cfg.output:
        raise UserError("usage: alignkit export RUN/final --output DIR [--dtype bf16]")
    source, out = Path(cfg.model), Path(cfg.output)
    is_adapter = (source / "adapter_config.json").is_file()
    if not is_adapter and not (source / "config.json").is_file():
        raise UserError(f"{source}: not a model or adapter folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty")
    tokenizer = load_tokenizer(source)
    if is_adapter and cfg.merge:
        adapter_model = load_adapter_model(source).eval()
        merged = load_adapter_model(source).merge_and_unload().eval()
        gap = merged_matches_adapter(adapter_model, merged, tokenizer)
        if gap > 1e-3:
            raise RunError(f"merged logits differ from the adapter model's by {gap:.2e}; nothing written")
        log(f"merged the adapter; logits match the adapter model's (max difference {gap:.1e})")
        model = merged
    elif is_adapter:
        shutil.copytree(source, out)
        return out
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if cfg.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"exported to {out} ({cfg.dtype}); load it with AutoModelForCausalLM.from_pretrained or vLLM")
    return out
