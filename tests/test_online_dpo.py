"""`alignkit dpo --online`: rounds sample from the policy being trained, the reference stays the start model,
each round's time split is reported, resume restarts at a round boundary."""

from __future__ import annotations

import json
import sys

import pytest

from alignkit.cli import main
from alignkit.generation import generate
from alignkit.models.load import load_model, load_tokenizer
from alignkit.rewards import load_reward
from tests.conftest import write_jsonl

REWARD = '''
def score(prompt, completion):
    return float(len(completion))
'''
TIME_SPLIT = ("generation_s", "scoring_s", "training_s", "loading_saving_s", "round_s",
              "generation_plus_training_vs_training")


@pytest.fixture
def reward_spec(tmp_path, monkeypatch):
    (tmp_path / "online_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "online_reward:score"
    sys.modules.pop("online_reward", None)


def online(tmp_path, model, reward, *extra) -> tuple[int, object]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in
                                                      ("Hello there", "What is 42?", "Write a poem.", "Add 12.")])
    out = tmp_path / "run"
    code = main(["dpo", "--online", "--model", str(model), "--prompts", str(prompts), "--reward", reward,
                 "--output-dir", str(out), "--rounds", "2", "--n", "3", "--max-new-tokens", "8",
                 "--generation-batch-size", "2", "--batch-size", "2", "--lr", "5e-3", "--lr-scheduler", "constant",
                 "--beta", "0.5", "--dtype", "fp32", "--save-steps", "0", "--seed", "3", *extra])
    return code, out


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def round_samples(model, tokenizer, prompts: list[str], seed: int) -> list[str]:
    samples = generate(model, tokenizer, prompts, n=3, max_new_tokens=8, batch_size=2, seed=seed, show_progress=False)
    return [s.text for group in samples for s in group]


def test_round_two_samples_the_round_one_policy_against_the_start_reference(tmp_path, tiny_model_dir, reward_spec,
                                                                            capsys):
    code, out = online(tmp_path, tiny_model_dir, reward_spec)
    assert code == 0
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit: round ")]
    assert len(logged) == 2 and all("generation" in line and "scoring" in line and "training" in line
                                    for line in logged)
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [r["prompt"] for r in rows(tmp_path / "prompts.jsonl")]
    second = [r["completion"] for r in rows(out / "round-2" / "samples.jsonl")]
    # round 2 (seed 3 + 2) sampled the weights round 1 trained, not the start model's
    assert second == round_samples(load_model(out / "round-1" / "final"), tokenizer, prompts, 5)
    assert second != round_samples(load_model(tiny_model_dir), tokenizer, prompts, 5)
    for r in (1, 2):
        pairs = rows(out / f"round-{r}" / "pairs.jsonl")
        assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    # against the start model, round 2's first step already sees the policy round 1 moved
    first_step = rows(out / "round-2" / "metrics.jsonl")[0]
    assert abs(first_step["rewards/margins"]) > 1e-4
    summary = json.loads((out / "summary.json").read_text())
    per_round = rows(out / "metrics.jsonl")
    assert [r["round"] for r in per_round] == [1, 2] and summary["rounds"] == 2
    for row in per_round + [summary]:
        assert all(isinstance(row[k], float | int) and row[k] >= 0 for k in TIME_SPLIT)
    assert (out / "final" / "model.safetensors").is_file()


def test_previous_reference_is_the_policy_as_the_round_begins(tmp_path, tiny_model_dir, reward_spec):
    code, out = online(tmp_path, tiny_model_dir, reward_spec, "--online-reference", "previous")
    assert code == 0
    first_step = rows(out / "round-2" / "metrics.jsonl")[0]
    assert first_step["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first_step["rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_lora_rounds_keep_the_adapter_and_resume_after_the_last_finished_round(tmp_path, tiny_model_dir,
                                                                              reward_spec):
    code, out = online(tmp_path, tiny_model_dir, reward_spec, "--lora", "true")
    assert code == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert abs(rows(out / "round-2" / "metrics.jsonl")[0]["rewards/margins"]) > 1e-4  # reference: adapter off
    kept = (out / "round-1" / "pairs.jsonl").stat().st_mtime_ns
    code, out = online(tmp_path, tiny_model_dir, reward_spec, "--lora", "true", "--resume", "--rounds", "3")
    assert code == 0
    assert (out / "round-1" / "pairs.jsonl").stat().st_mtime_ns == kept
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == [1, 2, 3]


def test_bad_online_input_is_one_line_exit_2(tmp_path, tiny_model_dir, reward_spec, capsys):
    code = main(["dpo", "--online", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "a")])
    assert code == 2 and "--prompts" in capsys.readouterr().err
    code = main(["dpo", "--online", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "missing.jsonl")])
    assert code == 2 and "not found" in capsys.readouterr().err
    code, _ = online(tmp_path, tiny_model_dir, "no_such_module:score")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot import" in err
    code, _ = online(tmp_path, tiny_model_dir, "bogus")
    assert code == 2 and "reward 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_judge_reward_scores_each_completion_against_the_others(tiny_model_dir):
    scores = load_reward(f"judge:{tiny_model_dir}")(["Q"] * 3, ["yes", "no", "maybe"])
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
    assert sum(scores) == pytest.approx(1.5)  # every match hands out one point in all


def test_an_online_stage_of_a_pipeline_starts_from_the_previous_stage(tmp_path, tiny_model_dir, reward_spec):
    import yaml

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i}.", "completion": f"ok {i}"} for i in range(4)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Hello there", "Add 12.")])
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "pipe"),
        "defaults": {"dtype": "auto", "lr": 5e-3, "save_steps": 0},  # auto: the sampling copy where bf16 runs
        "stages": [{"name": "sft", "method": "sft", "data": [str(sft)], "max_steps": 1},
                   {"name": "online", "method": "dpo", "online": True, "prompts": str(prompts), "reward": reward_spec,
                    "rounds": 2, "n": 3, "max_new_tokens": 6}]}))
    assert main(["pipeline", str(plan)]) == 0
    out = tmp_path / "pipe" / "02-online"
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == str(tmp_path / "pipe" / "01-sft" / "final")
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == [1, 2]
    assert main(["pipeline", str(plan), "--resume"]) == 0  # finished: skipped


def test_the_sampling_copy_computes_the_live_policy(tokenizer):
    import torch

    from alignkit.models.load import add_lora
    from alignkit.recipes.online_dpo import sampling_copy
    from tests.conftest import build_model

    policy = add_lora(build_model(tokenizer), 4, 8, 0.0, ["all-linear"])
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)  # an adapter that has trained
    ids = tokenizer(["Hello there, what is 42?"], return_tensors="pt")["input_ids"]
    copy = sampling_copy(policy)
    assert not hasattr(copy, "disable_adapter")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live, copied = policy.eval()(ids).logits.float(), copy(ids).logits.float()
    assert (live - copied).abs().max() < 0.05 * live.abs().max()
    assert any(p.dtype == torch.float32 for p in policy.parameters())  # the policy itself is untouched
