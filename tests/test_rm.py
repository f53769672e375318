"""Reward models: the loss is its formula, rewards are transformers' own, TRL agrees, final/ is a reward."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.api import make_config
from alignkit.config import RMConfig
from alignkit.data.prefs import tokenize_preferences
from alignkit.data.sources import Row
from alignkit.data.templates import resolve_template
from alignkit.errors import UserError
from alignkit.losses.reward import bradley_terry_loss
from alignkit.models.load import load_reward_model
from alignkit.recipes import rm as recipe
from alignkit.training.forward import pair_rewards
from tests.conftest import write_jsonl

ROWS = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in [
    ("Add 12 and 30.", "42", "43"), ("Hello", "hello there", "go away"),
    ("What is the capital of France?", "Paris.", "London."), ("Write a short poem.", "The sea is blue.", "No."),
    ("hello there", "Hello world", "Bye"), ("The answer is", "42.", "unknown."),
    ("Add 1 and 2.", "3", "4"), ("café", "olá", "你好")]]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rm_config(**values) -> RMConfig:
    return make_config(RMConfig, {"chat_template": "plain", "dtype": "fp32", "save_steps": 0, **values})


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the formula, its value and gradients

@pytest.mark.parametrize("margin, lam", [(None, 0.0), (0.7, 0.0), (0.7, 0.05)])
def test_the_loss_is_its_formula_with_gradients(margin, lam):
    rc, rr = 0.8, -0.3
    c = torch.tensor([rc], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([rr], dtype=torch.float64, requires_grad=True)
    m = 0.0 if margin is None else margin
    loss = bradley_terry_loss(c, r, None if margin is None else torch.tensor([margin], dtype=torch.float64), lam)
    loss.sum().backward()
    d = rc - rr - m
    assert loss.item() == pytest.approx(-math.log(sig(d)) + lam * (rc + rr) ** 2, rel=1e-12)
    assert c.grad.item() == pytest.approx(-(1 - sig(d)) + 2 * lam * (rc + rr), rel=1e-12)
    assert r.grad.item() == pytest.approx((1 - sig(d)) + 2 * lam * (rc + rr), rel=1e-12)


# ---------------------------------------------------------------- rewards are transformers' own

@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_rewards_in_each_layout_equal_transformers_pooling(tiny_model_dir, tokenizer, pad_is_eos):
    """transformers scores the rightmost token that is not padding: with pad == eos that is the one before eos."""
    pad_id = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, torch.float32, False, pad_id).eval()
    pairs, _ = tokenize_preferences(tokenizer, resolve_template(tokenizer, "plain"),
                                    [Row(r, f"x:{i}") for i, r in enumerate(ROWS)], 512)
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([row.input_ids])).logits[0, 0]
                    for p in pairs for row in (p.chosen, p.rejected)]
        for layout in ("prefix_shared", "padded"):
            chosen, rejected, _ = pair_rewards(model, pairs, layout, pad_id, "cpu")
            got = torch.stack([chosen, rejected], dim=1).flatten()
            torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- TRL agrees

@pytest.mark.parametrize("with_margin", [False, True])
def test_first_step_loss_and_metrics_match_trl_reward_trainer(tmp_path, tiny_model_dir, with_margin):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    rows = [{**r, "margin": 0.25 * i} if with_margin else r for i, r in enumerate(ROWS)]
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=8,
                            learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                            use_cpu=True, max_length=512, seed=42, center_rewards_coefficient=0.01,
                            model_init_kwargs={"dtype": torch.float32})
    trainer = trl.RewardTrainer(model=str(tiny_model_dir), args=args,
                                processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                                train_dataset=Dataset.from_list(rows))
    trainer.train()
    theirs = next(row for row in trainer.state.log_history if "loss" in row)

    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe.run(rm_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "ours"),
                         batch_size=8, max_steps=1, lr=1e-3, seed=42, center_rewards_coefficient=0.01))
    ours = metrics(tmp_path / "ours")[0]
    for mine, trls in (("loss", "loss"), ("accuracy", "accuracy"), ("margin", "margin"), ("grad_norm", "grad_norm")):
        assert ours[mine] == pytest.approx(theirs[trls], rel=1e-4, abs=1e-4), mine
    mean_reward = (ours["rewards/chosen"] + ours["rewards/rejected"]) / 2
    assert mean_reward == pytest.approx(theirs["mean_reward"], rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------- final/ is a reward model

@pytest.mark.parametrize("lora", [False, True])
def test_training_learns_and_final_is_a_reward_that_prefs_and_eval_take(tmp_path, tiny_model_dir, lora):
    from transformers import AutoModelForSequenceClassification

    from alignkit.rewards import load_reward

    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    summary = recipe.run(rm_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "out"),
                                   batch_size=4, max_steps=30, lr=1e-2 if lora else 3e-3, lora=lora,
                                   lora_dropout=0.0, eval_data=[str(data)]))
    assert summary["eval/accuracy"] == 1.0 and summary["eval/loss"] < 0.2
    final = tmp_path / "out" / "final"
    assert not (final / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    # what prefs --reward and eval --reward call: chosen completions score above rejected ones
    reward = load_reward(str(final))
    texts = [r["prompt"] + r["chosen"] for r in ROWS] + [r["prompt"] + r["rejected"] for r in ROWS]
    scores = reward([""] * len(texts), texts)
    assert all(c > r for c, r in zip(scores[:len(ROWS)], scores[len(ROWS):], strict=True))


def test_resume_gives_the_same_metrics_and_weights(tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "prefs.jsonl", [{**r, "margin": 0.1 * i} for i, r in enumerate(ROWS)])
    common = {"model": str(tiny_model_dir), "data": [str(data)], "batch_size": 2, "grad_accum": 2, "max_steps": 6,
              "save_steps": 3, "lr": 1e-3, "warmup_ratio": 0.2, "center_rewards_coefficient": 0.01}
    recipe.run(rm_config(**common, output_dir=str(tmp_path / "a")))
    recipe.run(rm_config(**common, output_dir=str(tmp_path / "b")))
    checkpoints = tmp_path / "b" / "checkpoints"
    shutil.rmtree(checkpoints / "step-6")
    (checkpoints / "latest").write_text("step-3")
    recipe.run(rm_config(**common, output_dir=str(tmp_path / "b"), resume=True))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(b) == 6 and [{k: r[k] for k in recipe.METRICS} for r in a] == [{k: r[k] for k in recipe.METRICS}
                                                                             for r in b]
    wa, wb = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- bad input: one line

def test_bad_input_is_one_line(tmp_path, tiny_model_dir):
    from alignkit.cli import main

    bad_margin = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "margin": "lots"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: 'margin' must be a number, got 'lots'"):
        recipe.run(rm_config(model=str(tiny_model_dir), data=[str(bad_margin)], output_dir=str(tmp_path / "o1"),
                             max_steps=1))
    with pytest.raises(UserError, match="'center_rewards_coefficient' must be >= 0"):
        rm_config(data=["x.jsonl"], center_rewards_coefficient=-1)
    no_rejected = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(UserError, match="half.jsonl:1: missing field 'rejected'"):
        recipe.run(rm_config(model=str(tiny_model_dir), data=[str(no_rejected)], output_dir=str(tmp_path / "o2"),
                             max_steps=1))
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "config.json").write_text("{}")
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    assert main(["rm", "--model", str(tmp_path / "notamodel"), "--data", str(data), "--output-dir",
                 str(tmp_path / "o3"), "--max-steps", "1"]) == 2


# ---------------------------------------------------------------- two processes

def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    """3 steps over 9 pairs, global batch 4 x 2: the epoch ends with a 1-pair step, where one process has no pair
    and runs a filler pass of weight 0; an eval pair that only the first process holds."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from alignkit.cli import main

    rows = [{**r, "margin": 0.1 * i} for i, r in enumerate(ROWS + ROWS[:1])]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[:1])
    common = ["rm", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "3", "--dtype", "fp32",
              "--save-steps", "0", "--grad-accum", "2", "--eval-data", str(held_out), "--eval-steps", "2",
              "--lr", "1e-3", "--center-rewards-coefficient", "0.01", "--chat-template", "plain"]
    assert main([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    done = subprocess.run([sys.executable, "-m", "alignkit", *common, "--output-dir", str(tmp_path / "two"),
                           "--batch-size", "2", "--num-processes", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2 x 2 processes x 2 accumulation (ddp)" in done.stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2, 3, 3]
    for a, b in zip(one, two, strict=True):
        for key in (recipe.METRICS + ("pairs", "tokens")) if "loss" in a else ["eval/loss", "eval/accuracy"]:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    reference, saved = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("one", "two"))
    assert sorted(saved) == sorted(reference)
    assert max((reference[k] - saved[k]).abs().max().item() for k in reference) < 1e-4


def test_a_reward_model_starts_from_an_sft_lora_final(tmp_path, tiny_model_dir):
    from alignkit.api import make_sft_config
    from alignkit.recipes import sft

    rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS])
    sft.run(make_sft_config(model=str(tiny_model_dir), data=[str(rows)], output_dir=str(tmp_path / "sft"),
                            dtype="fp32", max_steps=1, lora=True, save_steps=0))
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    summary = recipe.run(rm_config(model=str(tmp_path / "sft" / "final"), data=[str(data)], max_steps=2,
                                   output_dir=str(tmp_path / "rm"), lora=True))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])


def test_the_python_api_trains_a_reward_model_from_keyword_arguments(tmp_path, tiny_model_dir):
    import alignkit

    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    summary = alignkit.rm(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "rm"), max_steps=1,
                          chat_template="plain", dtype="fp32", save_steps=0)
    assert summary["steps"] == 1 and (tmp_path / "rm" / "final" / "config.json").is_file()
    with pytest.raises(UserError, match="center_rewards_coefficient"):
        alignkit.rm(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "rm2"),
                    center_rewards_coefficient="lots")
