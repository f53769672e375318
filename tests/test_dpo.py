"""DPO: each loss is its formula, log-probs are exact, reference strategies agree, training learns, TRL agrees."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.api import make_dpo_config
from alignkit.data.prefs import to_preference, tokenize_preferences
from alignkit.data.sources import Row
from alignkit.data.templates import resolve_template
from alignkit.errors import UserError
from alignkit.losses.dpo import hinge_loss, ipo_loss, robust_loss, sigmoid_loss, simpo_loss
from alignkit.losses.sft import mean_nll
from alignkit.recipes import dpo as recipe
from alignkit.training.backend import store_linear_weights_in_bf16
from alignkit.training.forward import pair_logps
from tests.conftest import build_model, write_jsonl

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


# ---------------------------------------------------------------- the formulas, values and gradients

def test_each_loss_equals_its_formula_with_gradients():
    pc, pr, rc, rr = -3.0, -5.5, -4.0, -4.5
    lc, lr_ = 4.0, 6.0
    beta, eps, gamma = 0.3, 0.1, 0.5
    delta = (pc - rc) - (pr - rr)
    t = {name: torch.tensor([v], dtype=torch.float64, requires_grad=True)
         for name, v in (("pc", pc), ("pr", pr))}
    ref_c, ref_r = torch.tensor([rc], dtype=torch.float64), torch.tensor([rr], dtype=torch.float64)
    len_c, len_r = torch.tensor([lc], dtype=torch.float64), torch.tensor([lr_], dtype=torch.float64)
    d = (t["pc"] - ref_c) - (t["pr"] - ref_r)
    cases = {
        "sigmoid": (sigmoid_loss(d, beta), -math.log(sig(beta * delta)), -beta * (1 - sig(beta * delta))),
        "smoothed": (sigmoid_loss(d, beta, eps),
                     -(1 - eps) * math.log(sig(beta * delta)) - eps * math.log(sig(-beta * delta)),
                     -beta * ((1 - eps) * (1 - sig(beta * delta)) - eps * sig(beta * delta))),
        "robust": (robust_loss(d, beta, eps),
                   (-(1 - eps) * math.log(sig(beta * delta)) + eps * math.log(sig(-beta * delta))) / (1 - 2 * eps),
                   -beta * ((1 - eps) * (1 - sig(beta * delta)) + eps * sig(beta * delta)) / (1 - 2 * eps)),
        "hinge": (hinge_loss(d, beta), max(0.0, 1 - beta * delta), -beta if 1 - beta * delta > 0 else 0.0),
    }
    for name, (value, expected, dldpc) in cases.items():
        t["pc"].grad = None
        value.sum().backward(retain_graph=True)
        assert value.item() == pytest.approx(expected, rel=1e-9), name
        assert t["pc"].grad.item() == pytest.approx(dldpc, rel=1e-9), name  # ∂/∂ℓθ(y_c) = ∂/∂Δ

    u = (pc - rc) / lc - (pr - rr) / lr_ - 1 / (2 * beta)
    t["pc"].grad = None
    ipo = ipo_loss(t["pc"] - ref_c, t["pr"] - ref_r, len_c, len_r, beta)
    ipo.sum().backward()
    assert ipo.item() == pytest.approx(u * u) and t["pc"].grad.item() == pytest.approx(2 * u / lc)

    s = beta * (pc / lc - pr / lr_) - gamma
    t["pc"].grad = None
    simpo = simpo_loss(t["pc"], t["pr"], len_c, len_r, beta, gamma)
    simpo.sum().backward()
    assert simpo.item() == pytest.approx(-math.log(sig(s)))
    assert t["pc"].grad.item() == pytest.approx(-(1 - sig(s)) * beta / lc)

    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)  # 0: untrained
    nll = mean_nll(token_logps, 3)
    nll.backward()
    assert nll.item() == pytest.approx((1 + 2 + 0.5) / 3)
    assert torch.equal(token_logps.grad, torch.full((2, 3), -1 / 3))


# ---------------------------------------------------------------- data

def test_implicit_prompt_identical_pairs_and_empty_completions():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Capital of France?"}]
    example = to_preference(Row({"chosen": conv + [{"role": "assistant", "content": "Paris."}],
                                 "rejected": conv + [{"role": "assistant", "content": "Rome."}]}, "p.jsonl:1"))
    assert [m.content for m in example.prompt] == ["Hi", "Hello", "Capital of France?"]
    assert [m.content for m in example.chosen] == ["Paris."] and [m.content for m in example.rejected] == ["Rome."]
    assert to_preference(Row({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "p.jsonl:2")) is None
    with pytest.raises(UserError, match="p.jsonl:3: field 'rejected' is empty"):
        to_preference(Row({"prompt": "Hi", "chosen": "Yes", "rejected": " "}, "p.jsonl:3"))
    with pytest.raises(UserError, match="p.jsonl:4: missing field 'chosen'"):
        to_preference(Row({"prompt": "Hi", "rejected": "No"}, "p.jsonl:4"))


def test_chosen_and_rejected_share_the_prompt_tokens(tokenizer):
    rows = [Row(p, f"p.jsonl:{i}") for i, p in enumerate(PAIRS, 1)] + [Row({"prompt": "x", "chosen": "a",
                                                                              "rejected": "a"}, "p.jsonl:9")]
    pairs, stats = tokenize_preferences(tokenizer, resolve_template(tokenizer, None), rows, 512)
    assert stats.pairs == 4 and stats.identical == 1
    pair = pairs[0]
    first_c = next(i for i, label in enumerate(pair.chosen.labels) if label != -100)
    first_r = next(i for i, label in enumerate(pair.rejected.labels) if label != -100)
    assert first_c == first_r and pair.chosen.input_ids[:first_c] == pair.rejected.input_ids[:first_r]
    scored = [t for t, label in zip(pair.chosen.input_ids, pair.chosen.labels, strict=True) if label != -100]
    assert tokenizer.decode(scored) == "42<|im_end|>"


# ---------------------------------------------------------------- log-probs and references

def pairs_for(tokenizer):
    rows = [Row(p, f"p.jsonl:{i}") for i, p in enumerate(PAIRS, 1)]
    return tokenize_preferences(tokenizer, resolve_template(tokenizer, None), rows, 512)[0]


def test_batched_logps_equal_separate_forwards(tokenizer):
    model = build_model(tokenizer).eval()
    pairs = pairs_for(tokenizer)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, pairs, "padded", tokenizer.pad_token_id, "cpu")[:2]
        batched = torch.cat([chosen, rejected])
        separate = []
        for seq in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
            logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0, :-1].log_softmax(-1)
            separate.append(sum(logits[t, seq.input_ids[t + 1]].item() for t in range(len(seq.input_ids) - 1)
                                if seq.labels[t + 1] != -100))
    assert batched.tolist() == pytest.approx(separate, abs=1e-5)


def test_all_reference_strategies_give_the_same_loss(tmp_path, tiny_model_dir, tokenizer):
    """copy (a reloaded initial policy), adapter (LoRA switched off) and precomputed agree on one batch."""
    from alignkit.models.load import build_policy
    from alignkit.training import reference
    from alignkit.training.backend import Backend

    pairs = pairs_for(tokenizer)
    for position, pair in enumerate(pairs):
        pair.position = position
    backend = Backend.build("fp32")
    pad = tokenizer.pad_token_id
    losses = {}
    runs = (("copy", False, None), ("adapter", True, None), ("precomputed", False, None),
            ("precomputed", True, None), ("copy", True, str(tiny_model_dir)))
    for kind, lora, ref_model in runs:
        cfg = make_dpo_config(model=str(tiny_model_dir), data=["unused"], lora=lora, reference=kind,
                              lora_dropout=0.0, dtype="fp32", ref_model=ref_model)
        torch.manual_seed(1)
        policy = build_policy(cfg, tiny_model_dir, None)
        if not lora:  # move the policy away from the reference so the loss is not log 2
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        else:
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_B" in name:
                        p.add_(0.05 * torch.randn_like(p))
        ref = reference.build(cfg, kind, tiny_model_dir, backend, pad)
        if kind == "precomputed":
            ref = reference.precompute(ref, policy, [pairs], cfg, "prefix_shared", backend, tiny_model_dir)[0]
        objective = recipe.DPO(cfg)
        objective.pad_id = pad
        policy.eval()
        with torch.no_grad():
            loss, sums = objective.loss(policy, recipe.PairPass(pairs, ref), torch.tensor([len(pairs), 1.0]))
        losses[(kind, lora, ref_model)] = (loss.item(), sums["rewards/margins"].item())
    assert losses[("copy", False, None)] == pytest.approx(losses[("precomputed", False, None)], abs=1e-6)
    # Under LoRA: the adapter switched off, the stored log-probs and a frozen copy of the base all agree.
    assert losses[("adapter", True, None)] == pytest.approx(losses[("precomputed", True, None)], abs=1e-6)
    assert losses[("adapter", True, None)] == pytest.approx(losses[("copy", True, str(tiny_model_dir))], abs=1e-6)
    assert losses[("copy", False, None)][0] != pytest.approx(math.log(2), abs=1e-4)
    assert losses[("adapter", True, None)][0] != pytest.approx(math.log(2), abs=1e-4)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("lora", [False, True])
def test_training_drives_reward_accuracy_to_one_and_margins_up(tmp_path, tiny_model_dir, lora):
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS + [{"prompt": "Hi", "chosen": "Same", "rejected": "Same"}])
    cfg = make_dpo_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "out"),
                          batch_size=4, max_steps=40 if lora else 25, lr=2e-2 if lora else 5e-3, dtype="fp32",
                          lora=lora, lora_dropout=0.0, lr_scheduler="constant")
    summary = recipe.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    margins = [r["rewards/margins"] for r in rows]
    assert rows[-1]["rewards/accuracies"] == 1.0 and margins[-1] > 0.5 and margins[-1] > 3 * margins[1]
    assert set(rows[0]) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected", "grad_norm", "lr", "pairs", "tokens",
                            "tokens_per_s"}
    assert summary["rows"]["identical"] == 1 and summary["pairs_per_s"] > 0
    assert summary["reference"] == ("adapter" if lora else "copy")
    final = tmp_path / "out" / "final"
    assert (final / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()


def test_dpo_on_top_of_an_sft_lora_adapter(tmp_path, tiny_model_dir):
    from alignkit.api import make_sft_config
    from alignkit.recipes import sft

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                for p in PAIRS[:3]])
    sft.run(make_sft_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "sft"),
                            lora=True, max_steps=3, lr=1e-2, dtype="fp32"))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    summary = recipe.run(make_dpo_config(model=str(tmp_path / "sft" / "final"), data=[str(prefs)],
                                         output_dir=str(tmp_path / "dpo"), lora=True, max_steps=2, dtype="fp32"))
    assert summary["steps"] == 2 and summary["reference"] == "adapter"


def test_dpo_cli_bad_row_is_one_line(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "Hi", "chosen": 3, "rejected": "b"}\n')
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{data}:2: field 'chosen' must be text" in err
    code = main(["dpo", "--data", str(data), "--loss-type", "sigmoid", "simpo", "--loss-weights", "1"])
    assert code == 2 and "needs one weight per loss_type" in capsys.readouterr().err


# ---------------------------------------------------------------- TRL, the anchor

def test_first_step_loss_and_rewards_match_trl_dpo_trainer(tmp_path, tiny_model_dir, tokenizer):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_dir = tmp_path / "ref"  # a different reference, so the first loss is not simply log 2
    build_model(tokenizer, seed=1).save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in [
        ("Add 12 and 30.", "42", "43"), ("Hello", "hello there", "go away"),
        ("What is the capital of France?", "Paris.", "London."), ("Write a short poem.", "The sea is blue.", "No."),
        ("hello there", "Hello world", "Bye"), ("The answer is", "42.", "unknown."),
        ("Add 1 and 2.", "3", "4"), ("café", "olá", "你好")]]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=8,
                         learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                         use_cpu=True, max_length=512, beta=0.1, seed=0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args,
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                             train_dataset=Dataset.from_list(rows))
    trainer.train()
    theirs = next(row for row in trainer.state.log_history if "loss" in row)

    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe.run(make_dpo_config(model=str(tiny_model_dir), ref_model=str(ref_dir), data=[str(data)],
                               output_dir=str(tmp_path / "ours"), chat_template="plain", batch_size=8,
                               max_steps=1, lr=1e-3, beta=0.1, dtype="fp32"))
    ours = json.loads((tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("tied", [False, True])
def test_a_reference_with_bf16_linear_weights_scores_bit_for_bit_like_fp32_under_autocast(tokenizer, tied):
    import copy

    policy = build_model(tokenizer)
    if tied:
        policy.lm_head.weight = policy.model.embed_tokens.weight
    reference = copy.deepcopy(policy).requires_grad_(False)
    fp32_frozen = copy.deepcopy(reference)
    store_linear_weights_in_bf16(reference)
    assert reference.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    assert (reference.lm_head.weight.dtype == torch.float32) == tied
    pairs = pairs_for(tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = [torch.cat(pair_logps(model, pairs, layout, tokenizer.pad_token_id, "cpu")[:2])
                  for model in (policy, fp32_frozen, reference) for layout in ("prefix_shared", "padded")]
    assert all(torch.equal(scores[i], scores[i + 2]) and torch.equal(scores[i], scores[i + 4]) for i in (0, 1))


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_bf16_first_step_is_log_2_whatever_the_reference(tmp_path, tiny_model_dir, reference):
    """Under bf16 autocast the policy's and the reference's log-probs are computed alike (the output head
    included: `training.backend.Backend.autocast`), so at step 1, where policy == reference, the loss is log 2."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("dtype auto runs fp32 on this CPU (no fast bf16)")
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    cfg = make_dpo_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "out"),
                          batch_size=4, max_steps=1, dtype="auto", reference=reference, save_steps=0)
    recipe.run(cfg)
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-7) and row["rewards/margins"] == 0.0


def test_precomputed_log_probs_are_cached_whole_and_kept_by_pair_position(tmp_path, capsys):
    from types import SimpleNamespace

    from alignkit.errors import RunError
    from alignkit.training import reference

    cache = tmp_path / "logps.safetensors"
    cache.write_bytes(b"half a file")  # what a crash in the middle of an unguarded write leaves
    assert reference._cached(cache, 3) is None and "unreadable reference log-probs" in capsys.readouterr().err
    scores = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    reference._write(cache, scores)
    assert torch.equal(reference._cached(cache, 3), scores) and reference._cached(cache, 4) is None
    assert [p.name for p in tmp_path.iterdir()] == ["logps.safetensors"]  # no staging file left
    stored = reference.Precomputed(scores, "cpu")
    chosen, rejected = stored.logps(None, [SimpleNamespace(position=2), SimpleNamespace(position=0)], "padded")
    assert chosen.tolist() == [-5.0, -1.0] and rejected.tolist() == [-6.0, -2.0]
    for position in (-1, 3):  # read outside a stored set, or from another one
        with pytest.raises(RunError, match="precomputed reference log-probs need the pairs of the set"):
            stored.logps(None, [SimpleNamespace(position=position)], "padded")
