"""LoRA's frozen base stored in bf16 under bf16 autocast: the same computation in half the memory, undone when
training returns the model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.models.load import add_lora, load_model
from alignkit.recipes import dpo, sft
from alignkit.training import loop
from alignkit.training.backend import mixed_precision, restore_fp32, store_frozen_linears_in_bf16
from tests.conftest import write_jsonl

BF16 = mixed_precision("auto") == "bf16"
ROWS = [{"prompt": "Add 12 and 30.", "completion": "The answer is 42."},
        {"prompt": "Hello", "completion": "hello there"},
        {"prompt": "What is the capital of France?", "completion": "Paris."},
        {"prompt": "Write a short poem.", "completion": "The sea is blue."}]


def test_frozen_linears_go_to_bf16_and_back_computing_the_same_under_autocast(tiny_model_dir):
    model = add_lora(load_model(tiny_model_dir), r=4, alpha=8, dropout=0.0, targets=["all-linear"])
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids).logits
    layers = store_frozen_linears_in_bf16(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(ids).logits
    assert torch.equal(before, after)
    names = {id(m): n for n, m in model.named_modules()}
    converted = sorted(names[id(m)] for m in layers)
    assert converted[0].endswith("lm_head")  # untied and frozen: the head is stored in bf16 too
    assert len(converted) == 15 and all(n.endswith("base_layer") for n in converted[1:])  # 2 layers x 7 linears
    assert all(m.weight.dtype == torch.bfloat16 for m in layers)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # a lookup is not autocast
    restore_fp32(layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("settings, partitioned, half, expected", [
    ({}, False, True, True),
    ({"lora": False}, False, True, False),
    ({"use_dora": True}, False, True, False),
    ({"lora_init": "pissa"}, False, True, False),
    ({}, True, True, False),
    ({}, False, False, False),
])
def test_the_base_is_stored_in_bf16_only_where_autocast_computes_it_so(settings, partitioned, half, expected):
    cfg = SimpleNamespace(**{"lora": True, "use_dora": False, "lora_init": "default", **settings})
    assert loop.bf16_base(cfg, SimpleNamespace(half=half, partitioned=partitioned)) is expected


@pytest.mark.skipif(not BF16, reason="no bf16 autocast on this CPU: the base stays fp32")
def test_lora_training_with_the_bf16_base_is_bit_identical_and_returns_fp32_layers(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    rule, store, stored = loop.bf16_base, loop.store_frozen_linears_in_bf16, []
    monkeypatch.setattr(loop, "store_frozen_linears_in_bf16", lambda model: stored.append(store(model)) or stored[-1])
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(loop, "bf16_base", lambda cfg, backend, on=on: on and rule(cfg, backend))
        out = tmp_path / f"run-{on}"
        summary, model, _ = sft.train(make_sft_config({
            "model": str(tiny_model_dir), "data": [str(data)], "output_dir": str(out), "save_steps": 0,
            "batch_size": 2, "max_steps": 3, "lr": 1e-2, "lora": True, "lora_r": 4, "lora_alpha": 8}))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[on] = (losses, load_file(out / "final" / "adapter_model.safetensors"))
    assert len(stored) == 1 and len(stored[0]) == 15  # the run with the rule on stored 15 layers in bf16
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[True][1])


@pytest.mark.skipif(not BF16, reason="no bf16 autocast on this CPU: the base stays fp32")
def test_lora_dpo_on_the_bf16_base_starts_at_log_2(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No."} for r in ROWS])
    summary = dpo.run(make_dpo_config({"model": str(tiny_model_dir), "data": [str(data)],
                                       "output_dir": str(tmp_path / "dpo"), "save_steps": 0, "batch_size": 4,
                                       "max_steps": 1, "lora": True, "lora_r": 4, "lora_alpha": 8}))
    assert summary["reference"] == "adapter" and summary["final_loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
