"""KTO: the loss is its formula, rows and labels are stored, training learns, resume is exact, bad rows are one
line, TRL agrees."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from alignkit.api import make_kto_config
from alignkit.losses.kto import kto_loss, reference_point
from alignkit.recipes import kto as recipe
from tests.conftest import write_jsonl

ROWS = [
    {"prompt": "Add 12 and 30.", "completion": "42", "label": True},
    {"prompt": "Add 12 and 30.", "completion": "The answer is 43.", "label": False},
    {"prompt": "Hello", "completion": "hello there", "label": True},
    {"prompt": "What is the capital of France?", "completion": "London.", "label": False},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem."}],
     "completion": [{"role": "assistant", "content": "The sea is blue."}], "label": True},
    {"prompt": "Hello", "completion": "go away", "label": False},
]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_equals_its_formula_with_gradients():
    beta, wd, wu = 0.3, 1.5, 0.7
    policy = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -4.5], dtype=torch.float64)
    desirable = torch.tensor([True, False])
    kl_sum = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    z = reference_point(kl_sum, 3)
    assert z.item() == pytest.approx(0.3) and not z.requires_grad
    assert reference_point(torch.tensor(-2.0), 4).item() == 0.0  # an estimate below zero is clamped
    losses = kto_loss(policy, ref, desirable, z, beta, wd, wu)
    losses.sum().backward()
    r_d, r_u = -3.0 + 4.0, -5.0 + 4.5
    assert losses[0].item() == pytest.approx(wd * (1 - sig(beta * (r_d - 0.3))), rel=1e-12)
    assert losses[1].item() == pytest.approx(wu * (1 - sig(beta * (0.3 - r_u))), rel=1e-12)
    # d/dr (1 − σ(β(r − z))) = −β σ'(·); d/dr (1 − σ(β(z − r))) = +β σ'(·)
    s_d, s_u = sig(beta * (r_d - 0.3)), sig(beta * (0.3 - r_u))
    assert policy.grad[0].item() == pytest.approx(-wd * beta * s_d * (1 - s_d), rel=1e-10)
    assert policy.grad[1].item() == pytest.approx(wu * beta * s_u * (1 - s_u), rel=1e-10)


def test_partners_are_a_rotation_along_a_seeded_order():
    order, partner = recipe.partners(7, seed=3)
    assert sorted(order) == list(range(7)) and all(partner[i] != i for i in range(7))
    assert [partner[order[k]] for k in range(7)] == [order[k - 1] for k in range(7)]


def test_rows_are_stored_with_their_labels_and_the_cache_tells_kinds_apart(tmp_path, tokenizer):
    from alignkit.data.cache import load_feedback_rows, load_sft_rows
    from alignkit.data.feedback import mismatched
    from alignkit.data.templates import resolve_template

    data = write_jsonl(tmp_path / "kto.jsonl", [{**r, "completion": r["completion"]} for r in ROWS[:4]])
    template = resolve_template(tokenizer, None)
    rows, stats, cached = load_feedback_rows([str(data)], tokenizer, template, 512)
    assert not cached and (stats.desirable, stats.undesirable) == (2, 2)
    again, _, cached = load_feedback_rows([str(data)], tokenizer, template, 512)
    assert cached and [r.label for r in again] == [True, False, True, False]
    assert isinstance(again.stores[0].row_labels, np.memmap)
    sft_rows, _, sft_cached = load_sft_rows([str(data)], "auto", tokenizer, template, 512)  # same file, SFT rows
    assert not sft_cached and not hasattr(sft_rows[0], "label")
    kl = mismatched(again[0].sequence, again[1].sequence, 512)
    scored = [t for t, label in zip(kl.input_ids, kl.labels, strict=True) if label != -100]
    assert tokenizer.decode(kl.input_ids).startswith("<|im_start|>user\nAdd 12 and 30.")
    assert tokenizer.decode(scored) == "The answer is 43.<|im_end|>"


def test_training_separates_desirable_from_undesirable(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", ROWS)
    cfg = make_kto_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "out"),
                          batch_size=6, max_steps=25, lr=5e-3, dtype="fp32", lr_scheduler="constant", beta=0.5)
    summary = recipe.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0.0  # policy == reference
    assert rows[-1]["rewards/margins"] > 1.0 and rows[-1]["loss"] < 0.45
    assert rows[0]["count/chosen"] == 3 and rows[0]["count/rejected"] == 3
    assert summary["reference"] == "copy" and summary["rows"]["desirable"] == 3



def test_padded_and_per_sequence_layouts_agree(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", ROWS)
    rows = {}
    for layout in ("padded", "per_sequence"):
        recipe.run(make_kto_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / layout),
                                   batch_size=3, max_steps=2, lr=1e-2, dtype="fp32", layout=layout))
        rows[layout] = [json.loads(x) for x in (tmp_path / layout / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["padded"], rows["per_sequence"], strict=True):
        for key in ("loss", "kl", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert rows["padded"][1]["kl"] > 0

def test_resume_gives_the_same_losses_and_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "kto.jsonl", ROWS)
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "batch_size": 2, "grad_accum": 2,
              "max_steps": 4, "save_steps": 2, "lr": 1e-2, "lora": True, "lora_dropout": 0.1}
    recipe.run(make_kto_config(common | {"output_dir": str(tmp_path / "a")}))
    recipe.run(make_kto_config(common | {"output_dir": str(tmp_path / "b")}))
    checkpoints = tmp_path / "b" / "checkpoints"
    shutil.rmtree(checkpoints / "step-4")
    (checkpoints / "latest").write_text("step-2")
    recipe.run(make_kto_config(common | {"output_dir": str(tmp_path / "b"), "resume": True}))
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert len(rows[1]) == 4 and rows[0][-1]["kl"] > 0
    for key in ("loss", "kl", "rewards/chosen"):
        assert [r.get(key) for r in rows[0]] == [r.get(key) for r in rows[1]], key
    a, b = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "Hi", "completion": "a"}', "missing field 'label'"),
    ('{"prompt": "Hi", "completion": "a", "label": "yes"}', "field 'label' must be true or false, got 'yes'"),
    ('{"prompt": "Hi", "completion": "a", "label": 1}', "field 'label' must be true or false, got 1"),
    ('{"prompt": "Hi", "label": true}', "missing field 'completion'"),
])
def test_kto_cli_bad_row_is_one_line(tmp_path, tiny_model_dir, capsys, line, message):
    from alignkit.cli import main

    data = tmp_path / "kto.jsonl"
    data.write_text('{"prompt": "Hi", "completion": "a", "label": true}\n' + line + "\n")
    code = main(["kto", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{data}:2: {message}" in err, err


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_first_step_loss_and_metrics_match_trl_kto_trainer(tmp_path, tiny_model_dir, tokenizer, reference):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import build_model

    ref_dir = tmp_path / "ref"  # a different reference, so the first loss is not simply 0.5 and kl not 0
    build_model(tokenizer, seed=1).save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    rows = [{"prompt": p, "completion": " " + c, "label": label} for p, c, label in [
        ("Add 12 and 30.", "42", True), ("Hello", "hello there", True), ("Hello", "go away", False),
        ("What is the capital of France?", "London.", False), ("Write a short poem.", "The sea is blue.", True),
        ("The answer is", "unknown.", False), ("café", "olá", True)]]
    # TRL rotates completions along its batches in dataset order: give it the rows in our seeded order
    order, _ = recipe.partners(len(rows), seed=0)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=len(rows),
                         learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                         use_cpu=True, max_length=512, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8,
                         seed=0, precompute_ref_log_probs=reference == "precomputed")
    trainer = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args,
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                             train_dataset=Dataset.from_list([rows[i] for i in order]))
    trainer.train()
    theirs = next(row for row in trainer.state.log_history if "loss" in row)

    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe.run(make_kto_config(model=str(tiny_model_dir), ref_model=str(ref_dir), data=[str(data)],
                               output_dir=str(tmp_path / "ours"), chat_template="plain", batch_size=len(rows),
                               max_steps=1, lr=1e-3, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8,
                               dtype="fp32", reference=reference, seed=0))
    ours = json.loads((tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()[0])
    assert theirs["kl"] > 0
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("command", ["kto", "orpo"])
def test_help_lists_every_field_with_its_default(capsys, command):
    from alignkit.cli import COMMANDS, main
    from alignkit.config import fields_of

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"--{name.replace('_', '-')}" in text for name in fields_of(COMMANDS[command].config))
    assert "arXiv" in text and "(default: 0.1)" in text
