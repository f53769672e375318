"""`alignkit export RUN/final --output DIR [--format gguf]`: a standalone model, LoRA merged and checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignkit.errors import RunError, UserError
from alignkit.log import log
from alignkit.models.load import load_adapter_model, load_tokenizer


def merged_matches_adapter(adapter_model, merged, tokenizer) -> float:
    """Largest logit difference between the adapter model and the merged one on a probe sentence."""
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return (adapter_model(**probe).logits - merged(**probe).logits).abs().max().item()


def merged_model(source: Path, tokenizer, merge: bool):
    """The model to write: an adapter merged into its base (checked), else the full model; None keeps an
    unmerged adapter as it is."""
    from transformers import AutoModelForCausalLM

    if not (source / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if not merge:
        return None
    adapter_model = load_adapter_model(source).eval()
    merged = load_adapter_model(source).merge_and_unload().eval()
    gap = merged_matches_adapter(adapter_model, merged, tokenizer)
    if gap > 1e-3:
        raise RunError(f"merged logits differ from the adapter model's by {gap:.2e}; nothing written")
    log(f"merged the adapter; logits match the adapter model's (max difference {gap:.1e})")
    return merged


def gguf_logit_gap(model, tokenizer, path: Path) -> float:
    """Largest logit difference between the model and the GGUF file as transformers' GGUF loader reads it back."""
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return merged_matches_adapter(model, back, tokenizer)


def export_gguf(model, tokenizer, out: Path, quant: str) -> Path:
    from alignkit.cli import one_line
    from alignkit.generation import stop_ids
    from alignkit.gguf_export import modelfile, write_gguf

    out.mkdir(parents=True, exist_ok=True)
    path = write_gguf(model.eval(), tokenizer, out / f"model-{quant}.gguf", quant, name=out.name)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids(model, tokenizer)]
    (out / "Modelfile").write_text(modelfile(path.name, tokenizer, stops), encoding="utf-8")
    try:
        gap = f"max logit difference {gguf_logit_gap(model, tokenizer, path):.1e}"
    except Exception as err:  # transformers' loader covers fewer cases than llama.cpp; the file may still be fine
        gap = f"not checked: transformers cannot read it back ({one_line(err)})"
    log(f"wrote {path} and {out / 'Modelfile'} ({gap}); run it with llama.cpp or `ollama create NAME -f Modelfile`")
    return path


def run(cfg) -> Path:
    if not cfg.model or not cfg.output:
        raise UserError("usage: alignkit export RUN/final --output DIR [--dtype bf16] [--format gguf --quant q8_0]")
    source, out = Path(cfg.model), Path(cfg.output)
    if not (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
        raise UserError(f"{source}: not a model or adapter folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty")
    tokenizer = load_tokenizer(source)
    model = merged_model(source, tokenizer, cfg.merge or cfg.format == "gguf")
    if cfg.format == "gguf":
        export_gguf(model, tokenizer, out, cfg.quant)
        return out
    if model is None:
        shutil.copytree(source, out)
        return out
    if cfg.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"exported to {out} ({cfg.dtype}); load it with AutoModelForCausalLM.from_pretrained or vLLM")
    return out
