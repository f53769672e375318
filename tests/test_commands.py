"""generate, export and report on the tiny model."""

from __future__ import annotations

import json

import torch

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.cli import main
from alignkit.recipes import dpo, sft
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Add 12 and 30.", "completion": "42"}, {"prompt": "Hello", "completion": "hello there"}]


def lora_run(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    sft.run(make_sft_config(model=str(model_dir), data=[str(data)], output_dir=str(tmp_path / "run"), lora=True,
                            max_steps=3, lr=1e-2, dtype="fp32", lora_dropout=0.0, eval_fraction=0.5))
    return tmp_path / "run"


def test_export_merges_lora_with_equal_logits_and_writes_bf16(tmp_path, tiny_model_dir, capsys):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = lora_run(tmp_path, tiny_model_dir)
    assert main(["export", str(run / "final"), "--output", str(tmp_path / "merged")]) == 0
    assert "logits match" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapter = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")("Hello world", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapter(**ids).logits, atol=1e-5)
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()
    assert main(["export", str(run / "final"), "--output", str(tmp_path / "half"), "--dtype", "bf16"]) == 0
    weights = load_file(tmp_path / "half" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert main(["export", str(run / "final"), "--output", str(tmp_path / "merged")]) == 2  # never overwrites


def test_generate_streams_one_prompt_and_writes_many(tmp_path, tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello"}, {"prompt": "Add 12 and 30."}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--n", "3", "--max-new-tokens", "5", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and [r["prompt"] for r in rows[:3]] == ["Hello"] * 3
    assert main(["generate", "--model", str(tiny_model_dir)]) == 2


def test_report_draws_the_curves_a_run_logged(tmp_path, tiny_model_dir):
    run = lora_run(tmp_path, tiny_model_dir)
    assert main(["report", str(run)]) == 0
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "lr.png", "grad_norm.png", "throughput.png"}
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                   "rejected": "No."} for r in ROWS])
    dpo.run(make_dpo_config(model=str(tiny_model_dir), data=[str(prefs)], output_dir=str(tmp_path / "dpo"),
                            max_steps=2, dtype="fp32"))
    assert main(["report", str(tmp_path / "dpo")]) == 0
    made = {p.name for p in (tmp_path / "dpo" / "plots").iterdir()}
    assert {"rewards.png", "margins.png", "accuracies.png"} <= made
    assert "![margins](plots/margins.png)" in (tmp_path / "dpo" / "report.md").read_text()


def test_eval_on_sft_rows_matches_the_trainers_eval_loss(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    summary = sft.run(make_sft_config(model=str(tiny_model_dir), data=[str(data)], eval_data=[str(data)],
                                      output_dir=str(tmp_path / "run"), max_steps=2, dtype="fp32"))
    assert main(["eval", "--model", str(tmp_path / "run" / "final"), "--data", str(data),
                 "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())["sft"]
    assert abs(result["loss"] - summary["eval/loss"]) < 1e-5 and result["tokens"] == summary["eval/tokens"]


def test_eval_on_preferences_with_a_known_accuracy(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    sft.run(make_sft_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "run"),
                            max_steps=60, lr=1e-2, batch_size=2, dtype="fp32", lora=True, lora_dropout=0.0,
                            lora_r=8))
    trained = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "The sea is blue."} for r in ROWS]
    swapped = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in trained]
    model = str(tmp_path / "run" / "final")
    for rows, expected in ((trained, 1.0), (swapped, 0.0)):
        prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
        assert main(["eval", "--model", model, "--data", str(prefs), "--output", str(tmp_path / "e.json")]) == 0
        result = json.loads((tmp_path / "e.json").read_text())["preferences"]
        assert result["logp_accuracy"] == expected and result["reward_accuracy"] == expected

    (tmp_path / "length_reward.py").write_text("def score(prompt, completion):\n    return len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    assert main(["eval", "--model", model, "--prompts", str(tmp_path / "prompts.jsonl"), "--reward",
                 "length_reward:score", "--baseline", model, "--max-new-tokens", "8",
                 "--output", str(tmp_path / "s.json")]) == 0
    sampled = json.loads((tmp_path / "s.json").read_text())["sampled"]
    assert sampled["win_rate"] == 0.5 and sampled["mean_reward"] == sampled["baseline_mean_reward"]
    assert sampled["kl_to_reference"] > 0  # the adapter's samples are likelier under it than under the base


def test_chat_keeps_the_history_and_resets(tiny_model_dir, monkeypatch, capsys):
    from alignkit.commands import chat
    from alignkit.config import ChatConfig

    lines = iter(["Hello", "/reset", "Add 12 and 30.", "And 1 more?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    history = chat.run(ChatConfig(model=str(tiny_model_dir), max_new_tokens=4, system="Be brief."))
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["Add 12 and 30.", "And 1 more?"]
    assert "model> " in capsys.readouterr().out


def test_judge_in_both_orders_and_its_interval(tiny_model_dir, tmp_path, monkeypatch):
    from alignkit.eval.judge import judge, model_preference, summarize

    def knows_the_answer(text: str) -> float:  # prefers whichever response says 42
        a, b = text.split("Response A: ")[1].split("\n\nResponse B: ")
        return float(("42" in a) - ("42" in b.split("\n\n")[0]))

    outcomes = judge(knows_the_answer, ["Add 12 and 30."] * 3, ["42", "41", "42"], ["41", "42", "42"])
    assert outcomes == ["win", "loss", "tie"]
    always_a = judge(lambda text: 1.0, ["q"], ["x"], ["y"])  # a judge that always says A: position bias only
    assert always_a == ["tie"]
    summary = summarize(["win", "win", "tie", "loss"])
    assert summary["win"] == 0.5 and summary["tie"] == 0.25 and summary["score"] == 0.625
    assert summary["ci95"][0] < 0.625 < summary["ci95"][1]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    prefer = model_preference(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              AutoTokenizer.from_pretrained(tiny_model_dir))
    assert judge(prefer, ["Hello"], ["same answer"], ["same answer"]) == ["tie"]  # identical answers never win
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello"}, {"prompt": "Add 12 and 30."}])
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--reward", "sentiment", "--baseline", str(tiny_model_dir), "--judge", str(tiny_model_dir),
                 "--max-new-tokens", "6", "--n", "1", "--output", str(tmp_path / "j.json")]) == 0
    verdict = json.loads((tmp_path / "j.json").read_text())["sampled"]["judge"]
    assert verdict["n"] == 2 and verdict["tie"] == 1.0  # same model, same seed: the same answers
