"""The demo's parts: its data, rewards, preference pairing, the KL estimator, and a --quick run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.demo import data
from alignkit.eval.kl import completion_logps, sequence_kl
from alignkit.generation import Sample, generate
from alignkit.make_prefs import pair_up
from alignkit.rewards import load_reward
from tests.conftest import build_model, build_tokenizer, write_jsonl


def test_every_sft_review_has_the_format_and_a_rating_that_agrees_with_vader():
    train, held_out = data.prompts(0)
    assert len(train) == 64 and len(held_out) == 32 and not set(train) & set(held_out)
    reward = load_reward("sentiment")
    rows = data.sft_rows(train)
    sentiments = reward([""] * len(rows), [data.review_text(r["completion"]) for r in rows])
    assert all(data.format_score(r["completion"], v) == 1.0 for r, v in zip(rows, sentiments, strict=True))
    assert data.format_score("Great film.\nRating: 1/5", 0.6) == 0.0
    assert data.format_score("Great film.", 0.6) == 0.0


def test_each_reward_plugin_loads_and_scores(tmp_path, monkeypatch):
    sentiment = load_reward("sentiment")
    good, bad = sentiment(["p", "p"], ["A wonderful, beautiful film.", "A boring, awful mess."])
    assert good > 0.5 and bad < -0.5

    (tmp_path / "my_rewards.py").write_text("def length(prompt, completion):\n    return len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:length")(["p", "p"], ["abc", "abcdef"]) == [3.0, 6.0]

    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                         pad_token_id=tokenizer.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                         label2id={"NEGATIVE": 0, "POSITIVE": 1})
    classifier = tmp_path / "classifier"
    LlamaForSequenceClassification(config).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    scores = load_reward(str(classifier))(["p", "p"], ["Hello world", "The answer is 42."])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)

    from alignkit.errors import UserError

    with pytest.raises(UserError, match="cannot import"):
        load_reward("no_such_module_here:f")
    with pytest.raises(UserError, match="use sentiment, module:function"):
        load_reward("vibes")


def test_pairing_best_worst_and_all_above_a_margin():
    completions = ["a", "bbbb", "cc", "ddd"]
    rewards = [1.0, 4.0, 2.0, 3.0]
    best_worst = pair_up("P", completions, rewards)
    assert best_worst == [{"prompt": "P", "chosen": "bbbb", "rejected": "a", "chosen_reward": 4.0,
                           "rejected_reward": 1.0}]
    every = pair_up("P", completions, rewards, pairing="all", margin=1.5)
    assert [(r["chosen"], r["rejected"]) for r in every] == [("bbbb", "cc"), ("bbbb", "a"), ("ddd", "a")]
    assert pair_up("P", ["x", "y"], [0.5, 0.5]) == []
    # an empty reply (the model ended its turn at once) is no side of a pair: the next worst one is
    assert [(r["chosen"], r["rejected"]) for r in pair_up("P", ["a", " ", "cc"], [1.0, -1.0, 2.0])] == [("cc", "a")]
    assert pair_up("P", ["", "b"], [0.0, 1.0]) == []


def test_prefs_command_with_a_deterministic_reward_gives_exactly_the_expected_pairs(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """The pairs are best vs worst under the reward, computed here from the same seeded samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.cli import main

    (tmp_path / "length_reward.py").write_text("def score(prompt, completion):\n    return len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = ["Hello", "Add 12 and 30.", "What is the capital of France?"]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    code = main(["prefs", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--reward", "length_reward:score", "--n", "4", "--max-new-tokens", "12", "--dtype", "fp32",
                 "--output", str(tmp_path / "prefs.jsonl"), "--seed", "3"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    samples = generate(model, AutoTokenizer.from_pretrained(tiny_model_dir), prompts, n=4, max_new_tokens=12, seed=3,
                       show_progress=False)
    expected = []
    for prompt, group in zip(prompts, samples, strict=True):
        texts = [s.text for s in group]
        expected += pair_up(prompt, texts, [float(len(t)) for t in texts])
    assert rows == expected and rows
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows)


def test_kl_is_zero_for_identical_models_and_matches_a_hand_computation(tokenizer):
    policy, other = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    samples = generate(policy, tokenizer, ["Hello", "Add 12 and 30."], n=2, max_new_tokens=6, seed=0,
                       show_progress=False)
    flat = [s for group in samples for s in group]
    pad = tokenizer.pad_token_id
    same = completion_logps(policy, flat, pad)
    assert sequence_kl(same, completion_logps(build_model(tokenizer, seed=0), flat, pad)) == pytest.approx(0.0,
                                                                                                           abs=1e-6)

    def by_hand(model, sample: Sample) -> float:
        ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0].log_softmax(-1)
        start = len(sample.prompt_ids)
        return sum(logps[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))

    expected = sum(by_hand(policy, s) - by_hand(other, s) for s in flat) / len(flat)
    assert sequence_kl(same, completion_logps(other, flat, pad)) == pytest.approx(expected, abs=1e-4)
    assert not math.isclose(expected, 0.0)


def test_demo_quick_on_a_tiny_model_writes_every_artifact(tmp_path):
    reviews = [r["completion"] for r in data.sft_rows(data.prompts(0)[0])]
    tokenizer = build_tokenizer(extra_corpus=reviews, vocab_size=600)
    model_dir = tmp_path / "tiny"
    build_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    from alignkit.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(model_dir), "--output-dir", str(out),
                 "--beta-sweep", "0.1,0.5"]) == 0
    for name in ("report.md", "eval.json", "data/sft.jsonl", "data/prefs.jsonl", "data/train_prompts.jsonl",
                 "data/eval_prompts.jsonl", "sft/final/model.safetensors",
                 "dpo-beta0.1/final/adapter_model.safetensors", "dpo-beta0.5/metrics.jsonl", "plots/loss.png",
                 "plots/dpo_margins.png", "plots/dpo_accuracies.png",
                 "plots/rewards.png", "plots/reward_kl.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "eval.json").read_text())
    assert [r["beta"] for r in summary["dpo"]] == [0.1, 0.5]
    for result in summary["dpo"]:
        assert math.isfinite(result["kl_to_sft"]) and 0.0 <= result["win_rate_vs_sft"] <= 1.0
    report = (out / "report.md").read_text()
    assert "![reward vs KL](plots/reward_kl.png)" in report and "win rate vs SFT" in report
