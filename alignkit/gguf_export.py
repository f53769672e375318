"""A merged model as one GGUF file (llama.cpp, ollama, LM Studio): metadata, tokenizer, chat template, tensors.

What llama.cpp's own converter (convert_hf_to_gguf.py) does for these architectures, through the `gguf`
package: its writer, its tensor-name map and its Q8_0 quantiser. The two weight transforms llama.cpp expects:
- llama: q_proj and k_proj rows permuted from Hugging Face's half-split rotary layout to interleaved pairs;
- gemma3: RMSNorm weights stored as 1 + w (Gemma's norm multiplies by 1 + w, llama.cpp's by w).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from alignkit.errors import UserError

QUANTS = ("f16", "q8_0")
# Hugging Face model_type → the GGUF architecture name (gguf.MODEL_ARCH_NAMES)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
# llama.cpp names a byte-level BPE pre-tokenizer (its split rule); these are the ones recognised from tokenizer.json
GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}


def gguf_arch(config):
    import gguf

    name = ARCHITECTURES.get(config.model_type)
    if name is None:
        raise UserError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {config.model_type}")
    return next(arch for arch, value in gguf.MODEL_ARCH_NAMES.items() if value == name)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config, layer_type: str = "full_attention") -> float:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params)
    if params.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: rope scaling '{params['rope_type']}' is not supported yet")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def check_gemma3(config) -> None:
    """llama.cpp's gemma3 fixes what the file cannot say: local rope base 10000, every 6th layer global,
    attention scaled by 1/sqrt(head_dim), no soft-capping. A model that differs would run, wrongly."""
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    problems = {
        "layer_types": list(config.layer_types) != expected,
        "sliding rope_theta": rope_theta(config, "sliding_attention") != 10000.0,
        "query_pre_attn_scalar": config.query_pre_attn_scalar != head_dim(config),
        "soft-capping": bool(config.final_logit_softcapping or config.attn_logit_softcapping),
        "bidirectional attention": bool(getattr(config, "use_bidirectional_attention", False)),
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        raise UserError(f"GGUF export: this gemma3 differs from what llama.cpp assumes ({', '.join(bad)})")


def add_hparams(writer, config, arch: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    if arch == "gemma3":
        check_gemma3(config)
        writer.add_sliding_window(config.sliding_window)


# ---------------------------------------------------------------- tokenizer

def byte_level_pre(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's split rule; an unknown name would make llama.cpp refuse the file."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", [])
    if [p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    regex = parts[0].get("pattern", {}).get("Regex") if parts and parts[0].get("type") == "Split" else None
    for name in ("qwen2", "llama-bpe"):
        if regex == GGUF_PRE_TOKENIZER_SPLITS[name]:
            return name
    raise UserError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows (gpt-2, smollm, qwen2, "
                    "llama-bpe)")


def token_table(tokenizer, vocab_size: int, byte_fallback: bool) -> tuple[list[str], list[int]]:
    """Every id's token and its llama.cpp type; ids the tokenizer lacks (embedding rows padded to a round
    number) become unused [PADn] tokens, as llama.cpp's converter writes them."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            kind, token = gguf.TokenType.UNUSED, f"[PAD{i}]"
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        if i == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's "gpt2" model with merges; byte-fallback BPE (Gemma) as its sentencepiece
    ("llama") model, whose merge order is the score: earlier ids first, as in the vocabulary file."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="alignkit-gguf-") as folder:
        tokenizer.save_pretrained(folder)
        spec = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        if spec["model"]["type"] != "BPE":
            raise UserError(f"GGUF export: tokenizer model {spec['model']['type']} is not supported (BPE only)")
        byte_fallback = bool(spec["model"].get("byte_fallback"))
        tokens, types = token_table(tokenizer, vocab_size, byte_fallback)
        if byte_fallback:
            writer.add_tokenizer_model("llama")
            writer.add_token_scores([-float(i) for i in range(vocab_size)])
            writer.add_add_space_prefix(False)
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(byte_level_pre(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=not byte_fallback, n_vocab=vocab_size)
    if tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------- tensors

def to_llama_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of transformers' LlamaTensorProcessor._reverse_permute_weights (llama.cpp's `permute`)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def transformed(name: str, weight: torch.Tensor, config, arch: str) -> torch.Tensor:
    if arch == "llama" and name.endswith("q_proj.weight"):
        return to_llama_rope(weight, config.num_attention_heads)
    if arch == "llama" and name.endswith("k_proj.weight"):
        return to_llama_rope(weight, config.num_key_value_heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return weight + 1
    return weight


def encoded(weight: np.ndarray, quant: str):
    """(data, raw dtype): vectors stay float32 (as llama.cpp's converter keeps them); matrices become f16, or
    Q8_0 where their rows split into 32-value blocks."""
    import gguf

    if weight.ndim == 1:
        return weight.astype(np.float32), None
    if quant == "q8_0" and weight.shape[-1] % 32 == 0:
        return gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return weight.astype(np.float16), None


def add_tensors(writer, model, arch_id, arch: str, quant: str) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[arch_id])
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied to the embeddings
        found = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise UserError(f"GGUF export: no {arch} GGUF tensor for {name}")
        data = transformed(name, weight.detach().float(), config, arch).numpy()
        data, raw_dtype = encoded(data, quant)
        writer.add_tensor(found[1], data, raw_dtype=raw_dtype)


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", name: str = "model") -> Path:
    import gguf

    if quant not in QUANTS:
        raise UserError(f"'quant' must be one of {', '.join(QUANTS)}, got {quant!r}")
    arch_id = gguf_arch(model.config)
    arch = gguf.MODEL_ARCH_NAMES[arch_id]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, model.config, arch)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    with torch.no_grad():
        add_tensors(writer, model, arch_id, arch, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- ollama

# ollama templates are Go templates, not Jinja: the families recognised from the rendered prompt
GO_TEMPLATES = {
    "<|im_start|>": '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                    '<|im_start|>assistant\n',
    "<|start_header_id|>": '<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>'
                           '\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
    "<start_of_turn>": '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user'
                       '{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n',
}


def default_system(rendered: str) -> str | None:
    """The system message a chatml template adds when the conversation has none (SmolLM2, Qwen2.5 do)."""
    head = "<|im_start|>system\n"
    if rendered.startswith(head) and "<|im_end|>" in rendered:
        return rendered[len(head):rendered.index("<|im_end|>")]
    return None


def modelfile(gguf_name: str, tokenizer, stop_tokens: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
        family = next((marker for marker in GO_TEMPLATES if marker in rendered), None)
        if family is None:
            lines.append("# chat template: not a family written here; ollama uses the one inside the GGUF file")
        else:
            lines.append(f'TEMPLATE """{GO_TEMPLATES[family]}"""')
            system = default_system(rendered)
            if system:
                lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"
