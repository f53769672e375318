"""ORPO: the odds-ratio loss is its formula, training learns, resume is exact, bad rows are one line, TRL agrees."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from alignkit.api import make_orpo_config
from alignkit.losses.orpo import log_odds, odds_ratio_loss
from alignkit.recipes import orpo as recipe
from tests.conftest import write_jsonl

PAIRS = [
    {"prompt": "Add 12 and 30.", "chosen": "42", "rejected": "The answer is 43."},
    {"prompt": "Hello", "chosen": "hello there", "rejected": "go away"},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem."}],
     "chosen": [{"role": "assistant", "content": "The sea is blue."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_odds_ratio_loss_equals_its_formula_with_gradients():
    mc, mr = -0.4, -2.5  # mean token log-probs; -0.4 is above -log 2, where log(1 - e^m) takes its other branch
    c = torch.tensor([mc], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([mr], dtype=torch.float64, requires_grad=True)
    loss, ratio = odds_ratio_loss(c, r)
    loss.sum().backward()

    def odds(m: float) -> float:
        return math.log(math.exp(m) / (1 - math.exp(m)))

    expected_ratio = odds(mc) - odds(mr)
    assert ratio.item() == pytest.approx(expected_ratio, rel=1e-12)
    assert loss.item() == pytest.approx(-math.log(sig(expected_ratio)), rel=1e-12)
    # d log odds / dm = 1 / (1 - e^m); dL/d ratio = -(1 - σ(ratio))
    assert c.grad.item() == pytest.approx(-(1 - sig(expected_ratio)) / (1 - math.exp(mc)), rel=1e-10)
    assert r.grad.item() == pytest.approx((1 - sig(expected_ratio)) / (1 - math.exp(mr)), rel=1e-10)
    tiny = torch.tensor([-1e-9, -50.0], dtype=torch.float64)  # p near 1 and near 0 stay finite
    assert torch.isfinite(log_odds(tiny)).all()


def test_training_raises_accuracy_and_nll_falls(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    cfg = make_orpo_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "out"),
                           batch_size=4, max_steps=25, lr=5e-3, dtype="fp32", lr_scheduler="constant", beta=0.5)
    summary = recipe.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["nll_loss"] < rows[0]["nll_loss"] / 2
    assert rows[0]["loss"] == pytest.approx(rows[0]["nll_loss"] - 0.5 * rows[0]["log_odds_ratio"], abs=1e-6)
    assert "reference" not in summary and summary["pairs_per_s"] > 0


def test_resume_gives_the_same_losses_and_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "batch_size": 1, "grad_accum": 2,
              "max_steps": 4, "save_steps": 2, "lr": 1e-3, "lora": True, "lora_dropout": 0.1}
    recipe.run(make_orpo_config(common | {"output_dir": str(tmp_path / "a")}))
    recipe.run(make_orpo_config(common | {"output_dir": str(tmp_path / "b")}))
    checkpoints = tmp_path / "b" / "checkpoints"
    shutil.rmtree(checkpoints / "step-4")
    (checkpoints / "latest").write_text("step-2")
    recipe.run(make_orpo_config(common | {"output_dir": str(tmp_path / "b"), "resume": True}))
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[1]) == 4
    a, b = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_orpo_cli_bad_row_is_one_line(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": "a", "rejected": "b"}\n{"prompt": "Hi", "chosen": "a"}\n')
    code = main(["orpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{data}:2: missing field 'rejected'" in err
    assert main(["orpo", "--data", str(data), "--beta", "0"]) == 2
    assert "'beta' must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("nll_tokens", ["all", "completion"])
def test_first_step_loss_and_metrics_match_trl_orpo_trainer(tmp_path, tiny_model_dir, nll_tokens):
    """nll_tokens all is TRL's NLL (prompt tokens too); with completion, every metric but the NLL and the loss
    still equals TRL's, and the loss is the NLL plus the same odds-ratio term."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in [
        ("Add 12 and 30.", "42", "43"), ("Hello", "hello there", "go away"),
        ("What is the capital of France?", "Paris.", "London."), ("Write a short poem.", "The sea is blue.", "No."),
        ("hello there", "Hello world", "Bye"), ("The answer is", "42.", "unknown.")]]
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=6,
                      learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                      use_cpu=True, max_length=512, beta=0.25, seed=0)
    trainer = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                          train_dataset=Dataset.from_list(rows))
    trainer.train()
    theirs = next(row for row in trainer.state.log_history if "loss" in row)

    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe.run(make_orpo_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "ours"),
                                chat_template="plain", batch_size=6, max_steps=1, lr=1e-3, beta=0.25, dtype="fp32",
                                nll_tokens=nll_tokens))
    ours = json.loads((tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()[0])
    for key in recipe.METRICS:
        if nll_tokens == "completion" and key in ("loss", "nll_loss"):
            continue
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), key
    assert ours["loss"] == pytest.approx(ours["nll_loss"] - 0.25 * theirs["log_odds_ratio"], abs=1e-4)
