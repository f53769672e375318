"""GGUF export: transformers' own GGUF loader reads the file back with the exported model's logits and tokenizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alignkit.cli import main
from alignkit.errors import UserError
from alignkit.gguf_export import write_gguf
from tests.conftest import CORPUS, build_model, build_tokenizer
from tests.test_commands import lora_run

TEXT = "Hello world, what is the capital of France? 42 café"
GEMMA_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def qwen_tokenizer():
    """The conftest vocabulary in a Qwen2 tokenizer, whose split rule llama.cpp calls "qwen2"."""
    from transformers import Qwen2Tokenizer

    base = build_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = base.chat_template
    return tokenizer


def gemma_tokenizer():
    """A sentencepiece-style BPE (byte fallback, ▁ for spaces) as Gemma's, trained on the conftest corpus."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, show_progress=False, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)]))
    spec = json.loads(core.to_str())["model"]
    tokenizer = GemmaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def tiny(arch: str, **overrides):
    """A tiny random model of `arch` with its tokenizer; norms randomised so that a missed +1 would show."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
    elif arch == "qwen2":
        tokenizer = qwen_tokenizer()
        # 7 embedding rows past the tokenizer, as Qwen2.5 pads its vocabulary
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer) + 7, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True))
    else:
        tokenizer = gemma_tokenizer()
        # head_dim = query_pre_attn_scalar = 256: what both llama.cpp and transformers' GGUF loader assume
        config = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=4, max_position_embeddings=256)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{**config, **overrides}))
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.normal_(0.0, 0.3)
    return model.eval(), tokenizer


def f16_rounded(model):
    """The model with its matrices rounded to f16, as the f16 file stores them (vectors stay f32)."""
    rounded = copy.deepcopy(model)
    for param in rounded.parameters():
        if param.ndim == 2:
            param.data = param.data.half().float()
    return rounded


def read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_gguf_round_trip_through_transformers(tmp_path, arch):
    model, tokenizer = tiny(arch)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    gaps = {}
    for quant in ("f16", "q8_0"):
        back, back_tokenizer = read_back(write_gguf(model, tokenizer, tmp_path / f"{arch}-{quant}.gguf", quant))
        assert back_tokenizer(TEXT, add_special_tokens=False).input_ids == ids[0].tolist()
        assert back_tokenizer.chat_template == tokenizer.chat_template
        with torch.no_grad():
            reference = f16_rounded(model) if quant == "f16" else model
            gaps[quant] = (reference(ids).logits - back(ids).logits).abs().max().item()
    scale = model(ids).logits.abs().max().item()
    print(f"{arch}: |logits| {scale:.3f}, f16 gap to f16-rounded weights {gaps['f16']:.1e}, "
          f"q8_0 gap to the fp32 model {gaps['q8_0']:.1e}")
    assert gaps["f16"] < 1e-5  # only the f16 rounding of the weights differs
    assert gaps["q8_0"] < 0.05 * scale


def test_gguf_export_command_writes_file_and_modelfile(tmp_path, tiny_model_dir, capsys):
    run = lora_run(tmp_path, tiny_model_dir)
    out = tmp_path / "gguf"
    assert main(["export", str(run / "final"), "--output", str(out), "--format", "gguf", "--quant", "q8_0"]) == 0
    assert "max logit difference" in capsys.readouterr().err
    assert (out / "model-q8_0.gguf").is_file()
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_gguf_export_refuses_what_llama_cpp_would_run_wrongly(tmp_path, tiny_model_dir, capsys):
    model, tokenizer = tiny("gemma3", query_pre_attn_scalar=64)
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        write_gguf(model, tokenizer, tmp_path / "g.gguf")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=420)).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    assert main(["export", str(tmp_path / "gpt2"), "--output", str(tmp_path / "o"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "alignkit: error: GGUF export supports llama, qwen2, gemma3_text; this model is gpt2"
