"""The SFT recipe: the loss is the formula, training learns, LoRA and full outputs reload exactly, resume is exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignkit.api import make_sft_config
from alignkit.data.batches import collate
from alignkit.data.formats import to_example
from alignkit.data.sources import Row
from alignkit.data.templates import resolve_template
from alignkit.data.tokenize import IGNORE, tokenize_examples
from alignkit.losses import mean_nll, token_logprobs
from alignkit.recipes import sft as recipe
from tests.conftest import build_model, write_jsonl

ROWS = [
    {"prompt": "Add 12 and 30.", "completion": "42"},
    {"prompt": "Hello", "completion": "hello there"},
    {"prompt": "What is the capital of France?", "completion": "Paris."},
    {"messages": [{"role": "user", "content": "Write a short poem about the sea."},
                  {"role": "assistant", "content": "The sea is blue."}]},
]


def config(tmp_path, model_dir, **overrides):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    values = {"model": str(model_dir), "data": [str(data)], "output_dir": str(tmp_path / "out"), "dtype": "fp32",
              "batch_size": 2, "lr": 3e-3, "max_steps": 4, "lr_scheduler": "constant", "seed": 0}
    return make_sft_config(values | overrides)


def batch_of(tokenizer, rows):
    examples = [to_example(Row(r, f"row {i}")) for i, r in enumerate(rows)]
    tokenized, _ = tokenize_examples(tokenizer, resolve_template(tokenizer, None), examples, 512)
    return tokenized, collate(tokenized, tokenizer.pad_token_id)


def hand_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE:
                total -= torch.log_softmax(logits[b, t].double(), dim=-1)[target]
                count += 1
    return total / count


def test_sft_loss_equals_masked_cross_entropy_by_hand(tokenizer):
    model = build_model(tokenizer)
    _, batch = batch_of(tokenizer, ROWS)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, mask = token_logprobs(logits, batch["labels"])
    num_tokens = int(mask.sum())
    assert num_tokens == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert mean_nll(logps, num_tokens).item() == pytest.approx(hand_loss(logits, batch["labels"]).item(),
                                                                      rel=1e-5)


def test_accumulated_micro_batches_weigh_every_token_equally(tokenizer):
    """Two micro-batches normalised by the step's token count give the mean over all tokens, not of means."""
    model = build_model(tokenizer)
    _, whole = batch_of(tokenizer, ROWS)
    with torch.no_grad():
        logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    expected = hand_loss(logits, whole["labels"]).item()
    parts = [batch_of(tokenizer, ROWS[:1])[1], batch_of(tokenizer, ROWS[1:])[1]]
    total_tokens = sum(int((p["labels"][:, 1:] != IGNORE).sum()) for p in parts)
    summed = 0.0
    with torch.no_grad():
        for part in parts:
            part_logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            summed += mean_nll(token_logprobs(part_logits, part["labels"])[0], total_tokens).item()
    assert summed == pytest.approx(expected, rel=1e-5)


def test_first_logged_loss_is_the_loss_of_the_initial_model(tmp_path, tiny_model_dir, tokenizer):
    cfg = config(tmp_path, tiny_model_dir, max_steps=1, batch_size=4)
    recipe.run(cfg)
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _, batch = batch_of(tokenizer, ROWS)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert first["loss"] == pytest.approx(hand_loss(logits, batch["labels"]).item(), rel=1e-5)
    assert first["tokens"] == int((batch["labels"][:, 1:] != IGNORE).sum())


def generate(model, tokenizer, prompt: str) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_overfitting_a_handful_of_rows_then_greedy_generation_reproduces_them(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, max_steps=120, batch_size=4, lr=1e-2)
    summary, model, tokenizer = recipe.train(cfg)
    assert summary["final_loss"] < 0.05
    model.eval()
    assert generate(model, tokenizer, "Add 12 and 30.") == "42"
    assert generate(model, tokenizer, "Hello") == "hello there"
    out = tmp_path / "out"
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "final/config.json", "final/model.safetensors",
                 "final/tokenizer.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
    assert rows[-1]["loss"] < rows[0]["loss"] / 10


def test_full_model_reloads_to_identical_logits(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    summary, model, _ = recipe.train(config(tmp_path, tiny_model_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(summary["final"])
    _, batch = batch_of(tokenizer, ROWS)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                           reloaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits)


def test_lora_changes_only_adapter_weights_and_reloads_to_identical_logits(tmp_path, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    summary, model, _ = recipe.train(config(tmp_path, tiny_model_dir, lora=True, lora_r=4, lora_alpha=8,
                                            lora_dropout=0.0))
    trained = model.state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys and any("lora_B" in k and trained[k].abs().sum() > 0 for k in lora_keys)
    for key, value in base_before.items():
        peft_key = next(k for k in trained if k.endswith(key.replace(".weight", ".base_layer.weight"))
                        or k.endswith(key))
        assert torch.equal(trained[peft_key], value), key
    adapter_files = sorted(p.name for p in (tmp_path / "out" / "final").iterdir())
    assert "adapter_model.safetensors" in adapter_files and "model.safetensors" not in adapter_files
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), summary["final"])
    _, batch = batch_of(tokenizer, ROWS)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path, tiny_model_dir, lora):
    from safetensors.torch import load_file

    common = {"max_steps": 6, "save_steps": 3, "grad_accum": 2, "batch_size": 1, "lora": lora,
              "lr_scheduler": "cosine", "warmup_ratio": 0.2, "lora_dropout": 0.1}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recipe.run(config(tmp_path / "a", tiny_model_dir, **common))
    interrupted = config(tmp_path / "b", tiny_model_dir, **common)
    recipe.run(interrupted)
    # Drop everything after the step-3 checkpoint, as a crash before the step-6 save would, then resume.
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    assert [p.name for p in sorted(checkpoints.glob("step-*"))] == ["step-3", "step-6"]
    shutil.rmtree(checkpoints / "step-6")
    (checkpoints / "latest").write_text("step-3")
    recipe.run(make_sft_config(interrupted, resume=True))
    losses = [[json.loads(line)["loss"] for line in (d / "out" / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "a", tmp_path / "b")]
    assert len(losses[1]) == 6 and losses[0] == losses[1]
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(d / "out" / "final" / weights) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_run_reuses_the_tokenised_cache(tmp_path, tiny_model_dir, tokenizer):
    from alignkit.data.cache import load_sft_rows

    cfg = config(tmp_path, tiny_model_dir)
    template = resolve_template(tokenizer, None)
    first = load_sft_rows(cfg.data, "auto", tokenizer, template, 512)
    second = load_sft_rows(cfg.data, "auto", tokenizer, template, 512)
    assert (first[2], second[2]) == (False, True)
    assert [(r.input_ids, r.labels) for r in first[0]] == [(r.input_ids, r.labels) for r in second[0]]
    third = load_sft_rows(cfg.data, "auto", tokenizer, template, 20)  # another max_length: tokenised again
    assert third[2] is False


def test_eval_fraction_writes_eval_rows(tmp_path, tiny_model_dir):
    summary = recipe.run(config(tmp_path, tiny_model_dir, eval_fraction=0.25, eval_steps=2))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and summary["rows"]["eval"] == 1
    assert evals[-1]["eval/ppl"] == pytest.approx(2.718281828 ** evals[-1]["eval/loss"], rel=1e-6)
