"""experiments/preference_methods.py: the held-out judging every method shares, and a --quick run end to end."""

from __future__ import annotations

import json
import math

from alignkit.demo import data
from alignkit.demo import pipeline as demo
from alignkit.eval.kl import completion_logps
from alignkit.generation import generate
from alignkit.rewards import sentiment_reward
from experiments.preference_methods import feedback_rows, main, spread
from tests.conftest import build_model, build_tokenizer


def demo_model(tmp_path):
    reviews = [r["completion"] for r in data.sft_rows(data.prompts(0)[0])]
    tokenizer = build_tokenizer(extra_corpus=reviews, vocab_size=600)
    model = build_model(tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return model, tokenizer


def test_the_sft_model_judged_against_itself_has_kl_0_and_wins_half(tmp_path):
    model, tokenizer = demo_model(tmp_path)
    prompts, plan, reward = data.prompts(0)[1][:3], demo.QUICK, sentiment_reward()
    sft = generate(model, tokenizer, prompts, n=plan.eval_samples, max_new_tokens=plan.max_new_tokens, seed=8)
    sft_rewards = demo.score(sft, prompts, reward)
    figures = demo.held_out(model, tokenizer, prompts, plan, 7, reward, sft_rewards, False, "same",
                            lambda flat: completion_logps(model, flat, tokenizer.pad_token_id))
    assert figures["kl_to_sft"] == 0.0 and figures["win_rate_vs_sft"] == 0.5  # the same samples as the SFT ones
    assert len(figures["rewards"]) == len(prompts) * plan.eval_samples


def test_pairs_become_one_desirable_and_one_undesirable_row_each():
    rows = feedback_rows([{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    assert rows == [{"prompt": "p", "completion": "good", "label": True},
                    {"prompt": "p", "completion": "bad", "label": False}]
    assert spread([1.0]) == "1.000" and spread([1.0, 3.0]) == "2.000 ± 1.414"


def test_quick_run_trains_and_judges_every_method_and_continues_where_it_stopped(tmp_path):
    demo_model(tmp_path)
    out = tmp_path / "methods"
    argv = ["--quick", "--seeds", "3", "--model", str(tmp_path / "tiny"), "--output-dir", str(out)]
    results = main(argv)
    assert list(results[3]) == ["sft", "dpo", "online-dpo", "kto", "orpo"]
    for method, figures in results[3].items():
        assert math.isfinite(figures["kl_to_sft"]) and 0.0 <= figures["win_rate_vs_sft"] <= 1.0, method
    assert json.loads((out / "seed-3" / "online-dpo" / "summary.json").read_text())["rounds"] == 3
    kto_rows = (out / "seed-3" / "kto.jsonl").read_text().splitlines()
    pairs = (out / "seed-3" / "demo" / "data" / "prefs.jsonl").read_text().splitlines()
    assert len(kto_rows) == 2 * len(pairs)
    table = (out / "table.md").read_text().splitlines()
    assert [row.split(" | ")[0][2:] for row in table[4:]] == ["sft", "dpo", "online-dpo", "kto", "orpo"]
    assert (out / "reward_kl.png").stat().st_size > 10_000
    stamp = (out / "seed-3" / "figures.json").stat().st_mtime_ns
    assert main(argv) == results and (out / "seed-3" / "figures.json").stat().st_mtime_ns == stamp
