"""Every common architecture, as a tiny random model built here: alignkit's chunked log-probs equal plain
transformers' full-logit log-probs (value and gradient, fp32) in every layout, for tied and untied heads; SFT and
DPO train a step; export and reload give the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.data import packing
from alignkit.data.prefs import PreferenceRow
from alignkit.data.sources import Row
from alignkit.data.tokenize import IGNORE
from alignkit.training.forward import pair_logps, unit_sequence_logps
from tests.conftest import build_tokenizer, write_jsonl
from tests.test_layouts import PAIRS, ROWS, sft_rows

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
WINDOW = 6  # shorter than the test rows, so a sliding window changes what a token sees
ATTENTION = {"gemma2": "eager"}  # transformers has no SDPA path for Gemma 2 (attention soft-capping)


def configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama": (LlamaConfig, {}),
        "qwen2": (Qwen2Config, {}),  # q/k/v biases
        "qwen3": (Qwen3Config, {"head_dim": 8}),  # q/k norms
        "gemma2": (Gemma2Config, {"head_dim": 8, "final_logit_softcapping": 0.5, "attn_logit_softcapping": 2.0,
                                  "sliding_window": WINDOW, "query_pre_attn_scalar": 8}),
        "gemma3": (Gemma3TextConfig, {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                                      "layer_types": ["sliding_attention", "full_attention"]}),
        "mistral": (MistralConfig, {"sliding_window": WINDOW}),
        "phi3": (Phi3Config, {"sliding_window": WINDOW}),  # fused qkv and gate/up projections
    }


ARCHITECTURES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3"]


def build(name: str, tokenizer, tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    config_cls, extra = configs()[name]
    config = config_cls(vocab_size=len(tokenizer), tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                        attn_implementation=ATTENTION.get(name, "sdpa"), **SIZE, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so a skipped one shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def reference_logps(model, row) -> torch.Tensor:
    """Σ log softmax(logits)[label] of one row, from the model's own full logits."""
    ids, labels = torch.tensor([row.input_ids]), torch.tensor(row.labels[1:])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    mask = labels != IGNORE
    return logps[mask].gather(1, labels[mask][:, None]).sum()


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got: torch.Tensor, want: torch.Tensor, got_grads: dict, want_grads: dict) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=1e-5 * max(grad.abs().max().item(), 1.0),
                                   msg=lambda m, name=name: f"{name}: {m}")


def sft_logps(model, rows, layout: str, pad_id: int) -> torch.Tensor:
    units = packing.sft_units(rows, layout, pad_id, capacity=4096)
    if layout == "per_sequence":
        return torch.cat([unit_sequence_logps(model, u, 1)[0] for u in units])
    return unit_sequence_logps(model, units[0], len(rows))[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_chunked_logprobs_equal_full_logits_in_every_layout(name, tied, tokenizer):
    from alignkit.data.prefs import tokenize_preferences
    from alignkit.data.templates import resolve_template

    model = build(name, tokenizer, tied)
    rows = sft_rows(tokenizer)
    assert max(len(r.input_ids) for r in rows) > 2 * WINDOW
    weights = torch.linspace(0.5, 1.5, len(rows))
    want = torch.stack([reference_logps(model, r) for r in rows])
    want_grads = gradients(model, (want * weights).sum())
    for layout in ("per_sequence", "packed", "padded"):
        got = sft_logps(model, rows, layout, tokenizer.pad_token_id)
        assert_same(got.detach(), want.detach(), gradients(model, (got * weights).sum()), want_grads)

    rows = [Row(p, f"p{i}") for i, p in enumerate(PAIRS)]
    pairs: list[PreferenceRow] = tokenize_preferences(tokenizer, resolve_template(tokenizer, None), rows, 512)[0]
    want_c = torch.stack([reference_logps(model, p.chosen) for p in pairs])
    want_r = torch.stack([reference_logps(model, p.rejected) for p in pairs])
    want_grads = gradients(model, (want_c - 0.7 * want_r).sum())
    for layout in ("prefix_shared", "per_sequence", "padded"):
        chosen, rejected = pair_logps(model, pairs, layout, tokenizer.pad_token_id, "cpu")[:2]
        assert_same(torch.stack([chosen, rejected]).detach(), torch.stack([want_c, want_r]).detach(),
                    gradients(model, (chosen - 0.7 * rejected).sum()), want_grads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    folders = {}
    for name in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        build(name, tokenizer, tied=name.startswith("gemma")).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_sft_and_dpo_train_a_step_and_export_reloads_to_the_same_logits(name, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    import alignkit
    from alignkit.commands import export
    from alignkit.config import ExportConfig
    from alignkit.models.load import load_adapter_model

    sft_data = write_jsonl(tmp_path / "sft.jsonl", ROWS[:2])
    pref_data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS[:2])
    common = {"max_steps": 1, "batch_size": 2, "dtype": "fp32", "save_steps": 0, "compile": "off", "lr": 1e-2}
    sft = alignkit.sft(model=str(model_dirs[name]), data=[str(sft_data)], output_dir=str(tmp_path / "sft"),
                       lora=True, lora_dropout=0.0, **common)
    dpo = alignkit.dpo(model=str(model_dirs[name]), data=[str(pref_data)], output_dir=str(tmp_path / "dpo"),
                       **common)
    assert sft["steps"] == 1 and torch.isfinite(torch.tensor(sft["final_loss"]))
    assert dpo["steps"] == 1 and abs(dpo["final_loss"] - 0.6931) < 1e-3  # log 2: policy == reference at step 1

    final = tmp_path / "sft" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        model_dirs[name].resolve())
    export.run(ExportConfig(model=str(final), output=str(tmp_path / "exported")))
    probe = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        adapter = load_adapter_model(final).eval()(input_ids=probe).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()(input_ids=probe).logits
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "final").eval()(input_ids=probe).logits
        base = AutoModelForCausalLM.from_pretrained(model_dirs[name]).eval()(input_ids=probe).logits
    torch.testing.assert_close(exported, adapter, rtol=0, atol=1e-5)
    assert (exported - base).abs().max() > 1e-4 and (trained - base).abs().max() > 1e-4  # both steps trained
