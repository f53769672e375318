"""`alignkit pipeline`: stages chain through their final models, check everything first, resume stage by stage."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from alignkit.cli import main
from alignkit.models.load import load_model
from tests.conftest import write_jsonl


def sft_rows(word: str, n: int) -> list[dict]:
    return [{"prompt": f"Say {word} {i}.", "completion": f"{word} {i}"} for i in range(n)]


def write_plan(tmp_path, stages, **extra) -> str:
    plan = {"output_dir": str(tmp_path / "pipe"), "defaults": {"dtype": "fp32", "lr": 5e-3, "lr_scheduler": "constant",
                                                              "save_steps": 0}, "stages": stages, **extra}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_each_stage_starts_from_the_previous_stages_final_model(tmp_path, tiny_model_dir):
    first = write_jsonl(tmp_path / "first.jsonl", sft_rows("alpha", 6))
    second = write_jsonl(tmp_path / "second.jsonl", sft_rows("beta", 4))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
                                                   for i in range(4)])
    plan = write_plan(tmp_path, model=str(tiny_model_dir), stages=[
        # stage 1 ends by scoring the data stage 2 trains on: its eval/loss is stage 2's starting loss
        {"name": "one", "method": "sft", "data": [str(first)], "eval_data": [str(second)], "max_steps": 3},
        {"name": "two", "method": "sft", "data": [str(second)], "batch_size": 4, "max_steps": 2},
        {"name": "three", "method": "dpo", "data": [f"{prefs}@count=2"], "max_steps": 1, "lora": True}])
    assert main(["pipeline", plan]) == 0
    out = tmp_path / "pipe"
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == ["01-one", "02-two", "03-three"]
    stage_one_eval = [r for r in metrics(out / "01-one") if "eval/loss" in r][-1]["eval/loss"]
    assert metrics(out / "02-two")[0]["loss"] == pytest.approx(stage_one_eval, abs=1e-5)
    saved = yaml.safe_load((out / "03-three" / "config.yaml").read_text())
    assert saved["model"] == str(out / "02-two" / "final")
    report = json.loads((out / "pipeline.json").read_text())
    assert [s["model"] for s in report["stages"]] == [str(tiny_model_dir), str(out / "01-one" / "final"),
                                                      str(out / "02-two" / "final")]
    assert report["stages"][2]["sources"][0]["used"] == 2
    load_model(out / "03-three" / "final")  # an adapter over stage two's model loads as a model


def test_a_mistake_in_a_late_stage_stops_the_pipeline_before_anything_trains(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    plan = write_plan(tmp_path, model=str(tiny_model_dir), stages=[
        {"name": "one", "method": "sft", "data": [str(data)], "max_steps": 1},
        {"name": "two", "method": "sft", "data": [str(data)], "learning_rate": 1e-4}])
    assert main(["pipeline", plan]) == 2
    err = capsys.readouterr().err
    assert "stages[1] (two): unknown key 'learning_rate' (did you mean 'lr'?)" in err
    assert not (tmp_path / "pipe").exists()
    missing = write_plan(tmp_path, model=str(tiny_model_dir), stages=[
        {"name": "one", "method": "sft", "data": [str(data)]},
        {"name": "two", "method": "sft", "data": [str(tmp_path / "nope.jsonl")]}])
    assert main(["pipeline", missing]) == 2
    assert "nope.jsonl: data file not found" in capsys.readouterr().err


def test_resume_skips_finished_stages_and_refuses_a_changed_plan(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    stages = [{"name": "one", "method": "sft", "data": [str(data)], "max_steps": 2},
              {"name": "two", "method": "sft", "data": [str(data)], "max_steps": 2, "save_steps": 1}]
    plan = write_plan(tmp_path, model=str(tiny_model_dir), stages=stages)
    assert main(["pipeline", plan]) == 0
    out = tmp_path / "pipe"
    assert main(["pipeline", plan]) == 2
    assert "already holds a pipeline; pass --resume" in capsys.readouterr().err

    one_final = (out / "01-one" / "final" / "model.safetensors").stat().st_mtime_ns
    uninterrupted = metrics(out / "02-two")
    # stage two as if stopped after its step-1 checkpoint
    (out / "02-two" / "summary.json").unlink()
    shutil.rmtree(out / "02-two" / "checkpoints" / "step-2")
    (out / "02-two" / "metrics.jsonl").write_text(json.dumps(uninterrupted[0]) + "\n")
    assert main(["pipeline", plan, "--resume"]) == 0
    assert (out / "01-one" / "final" / "model.safetensors").stat().st_mtime_ns == one_final
    assert [r["loss"] for r in metrics(out / "02-two")] == pytest.approx([r["loss"] for r in uninterrupted])

    stages[0]["max_steps"] = 3
    changed = write_plan(tmp_path, model=str(tiny_model_dir), stages=stages)
    assert main(["pipeline", changed, "--resume"]) == 2
    assert "01-one: was run with max_steps: 2, the plan now says 3; run with --overwrite" in capsys.readouterr().err


def test_abilities_are_scored_for_the_base_and_after_every_stage(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"prompt": "anything", "checks": [{"type": "max_words", "value": 1000}]},
        {"prompt": "nothing", "checks": [{"type": "min_words", "value": 1000}]}])
    math = write_jsonl(tmp_path / "math.jsonl", [{"prompt": "1+1?", "answer": 123456789}])
    plan = write_plan(tmp_path, model=str(tiny_model_dir), evals={"general": str(general), "math": str(math)},
                      eval_base=True, eval_max_new_tokens=4,
                      stages=[{"name": "one", "method": "sft", "data": [str(data)], "max_steps": 1}])
    assert main(["pipeline", plan]) == 0
    table = (tmp_path / "pipe" / "abilities.md").read_text().splitlines()
    assert table[0] == "| stage | general | math |"
    assert table[2:] == ["| base | 0.500 | 0.000 |", "| one | 0.500 | 0.000 |"]
    assert (tmp_path / "pipe" / "01-one" / "abilities-samples.jsonl").is_file()


def test_lora_stages_on_lora_stages_keep_every_earlier_adapter(tmp_path, tiny_model_dir):
    first = write_jsonl(tmp_path / "first.jsonl", sft_rows("alpha", 4))
    second = write_jsonl(tmp_path / "second.jsonl", sft_rows("beta", 4))
    plan = write_plan(tmp_path, model=str(tiny_model_dir), stages=[
        {"name": "one", "method": "sft", "data": [str(first)], "max_steps": 2, "lora": True, "lr": 5e-2},
        {"name": "two", "method": "sft", "data": [str(first)], "eval_data": [str(second)], "max_steps": 2,
         "lora": True, "lr": 5e-2},
        {"name": "three", "method": "sft", "data": [str(second)], "batch_size": 4, "max_steps": 1, "lora": True}])
    assert main(["pipeline", plan]) == 0
    out = tmp_path / "pipe"
    base = json.loads((out / "02-two" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((out / "01-one" / "final").resolve())
    # stage three starts from stage two's adapter over stage one's adapter over the base: its first loss is the
    # loss stage two measured on the same rows with both adapters in place
    stage_two_eval = [r for r in metrics(out / "02-two") if "eval/loss" in r][-1]["eval/loss"]
    assert metrics(out / "03-three")[0]["loss"] == pytest.approx(stage_two_eval, abs=1e-5)


@pytest.mark.parametrize("name", ["multitask", "sequential", "mixed_sequential", "dmt"])
def test_the_shipped_strategy_plans_pass_every_check(name, monkeypatch):
    from pathlib import Path

    from alignkit.config import PipelineConfig
    from alignkit.eval.abilities import load_tasks
    from alignkit.pipeline import check_stages, read_plan

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    plan_file = f"examples/pipelines/{name}.yaml"
    plan, _, stages = read_plan(PipelineConfig(plan=plan_file))
    check_stages(stages, plan_file)
    assert all(load_tasks(path) for path in plan["evals"].values())
    if name == "dmt":
        fractions = [entry.get("fraction") for entry in stages[1].values["data"] if isinstance(entry, dict)]
        assert fractions == ["1/16", "1/16"]


def test_overwrite_deletes_only_what_a_pipeline_wrote_and_a_plan_inside_its_folder_resumes(tmp_path, tiny_model_dir,
                                                                                            capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    out = tmp_path / "pipe"
    plan = write_plan(tmp_path, model=str(tiny_model_dir),
                      stages=[{"name": "one", "method": "sft", "data": [str(data)], "max_steps": 1}])
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["pipeline", plan]) == 2
    assert "holds files but no pipeline (no plan.yaml)" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main(["pipeline", plan]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["pipeline", str(out / "plan.yaml"), "--resume"]) == 0  # the copy in the folder is the plan
    assert main(["pipeline", plan, "--resume", "--overwrite"]) == 2
    assert main(["pipeline", plan, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "01-one" / "summary.json").is_file()


def test_a_stage_trained_again_makes_the_stages_after_it_train_again(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": "p", "checks": [{"type": "max_words", "value": 9}]}])
    plan = write_plan(tmp_path, model=str(tiny_model_dir), evals={"general": str(general)}, eval_max_new_tokens=2,
                      stages=[{"name": "one", "method": "sft", "data": [str(data)], "max_steps": 1},
                              {"name": "two", "method": "sft", "data": [str(data)], "max_steps": 1}])
    assert main(["pipeline", plan]) == 0
    out = tmp_path / "pipe"
    two = (out / "02-two" / "final" / "model.safetensors").stat().st_mtime_ns
    scored = (out / "02-two" / "abilities.json").stat().st_mtime_ns
    assert main(["pipeline", plan, "--resume"]) == 0  # nothing changed: nothing trains, nothing is scored again
    assert (out / "02-two" / "abilities.json").stat().st_mtime_ns == scored
    (out / "01-one" / "summary.json").unlink()  # stage one as if it had stopped before writing its summary
    assert main(["pipeline", plan, "--resume"]) == 0
    assert "02-two: trained again, as the stage before it was" in capsys.readouterr().err
    assert (out / "02-two" / "final" / "model.safetensors").stat().st_mtime_ns != two
    assert (out / "02-two" / "abilities.json").stat().st_mtime_ns != scored  # a new model is scored again


def benchmark_evals(tmp_path, judge, chat_limit=2) -> dict:
    from tests.test_humaneval import PROBLEMS
    from tests.test_mtbench import write_data

    problems = write_jsonl(tmp_path / "humaneval.jsonl", PROBLEMS)
    questions = write_data(tmp_path / "mt-bench")
    return {"code": {"benchmark": "humaneval", "data": str(problems), "limit": 2},
            "chat": {"benchmark": "mt-bench", "data": str(questions), "limit": chat_limit, "judge": judge,
                     "judge_max_new_tokens": 3}}


def test_humaneval_and_mt_bench_are_ability_scorers(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    stages = [{"name": "one", "method": "sft", "data": [str(data)], "max_steps": 1}]
    plan = write_plan(tmp_path, model=str(tiny_model_dir), evals=benchmark_evals(tmp_path, str(tiny_model_dir)),
                      eval_base=True, eval_max_new_tokens=4, stages=stages)
    assert main(["pipeline", plan]) == 0
    out = tmp_path / "pipe"
    table = (out / "abilities.md").read_text()
    assert table.splitlines()[0] == "| stage | chat | code |"  # the plan's order (write_plan sorts keys)
    assert "chat: MT-Bench mean grade 1-10 (2 questions)" in table and "not GPT-4" in table
    for folder, row in zip(("00-base", "01-one"), table.splitlines()[2:4], strict=True):
        results = json.loads((out / folder / "abilities.json").read_text())["results"]
        code_file = out / folder / "abilities-samples-code.jsonl"
        samples = [json.loads(line) for line in code_file.read_text().splitlines()]
        assert results["code"]["score"] == sum(s["passed"] for s in samples) / 2 and results["code"]["rows"] == 2
        answers = (out / folder / "abilities-samples-chat.jsonl").read_text().splitlines()
        chat = results["chat"]
        assert len(answers) == 4 and chat["judged"] + chat["missing"] == 4 and chat["rows"] == 2
        shown = "-" if chat["score"] is None else f"{chat['score']:.3f}"
        assert row == f"| {folder[3:]} | {shown} | {results['code']['score']:.3f} |"
    scored = (out / "01-one" / "abilities.json").stat().st_mtime_ns
    assert main(["pipeline", plan, "--resume"]) == 0
    assert (out / "01-one" / "abilities.json").stat().st_mtime_ns == scored  # same sets, same judge: reused
    plan = write_plan(tmp_path, model=str(tiny_model_dir), evals=benchmark_evals(tmp_path, str(tiny_model_dir), 1),
                      eval_base=True, eval_max_new_tokens=4, stages=stages)
    assert main(["pipeline", plan, "--resume"]) == 0
    assert json.loads((out / "01-one" / "abilities.json").read_text())["results"]["chat"]["rows"] == 1


def test_a_humaneval_set_is_scored_in_its_prompt_format_and_the_machines_precision(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    from alignkit.eval import abilities, humaneval
    from alignkit.models.load import load_model, load_tokenizer
    from alignkit.training.backend import mixed_precision

    seen = {}

    def spy(model, tokenizer, problems, **settings):
        seen.update(settings)
        return {"pass@1": 0.5, "pass@1_ci95": [0.1, 0.9], "problems": len(problems)}

    monkeypatch.setattr(humaneval, "evaluate", spy)
    spec = abilities.benchmark_set({**benchmark_evals(tmp_path, "unused")["code"], "prompt_format": "chat"}, "evals")
    result = abilities.evaluate_sets(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), {"code": spec}, 4)
    assert result["code"] == {"score": 0.5, "ci95": [0.1, 0.9], "rows": 2}
    assert seen["prompt_format"] == "chat" and seen["autocast"] == (mixed_precision("auto") == "bf16")
    assert abilities.benchmark_set({"benchmark": "humaneval"}, "evals").prompt_format == "raw"


@pytest.mark.parametrize("chat, message", [
    ({"benchmark": "mt-bench"}, "evals.chat: mt-bench needs 'judge'"),
    ({"benchmark": "mmlu"}, "evals.chat: 'benchmark' must be one of humaneval, mt-bench, got 'mmlu'"),
    ({"benchmark": "humaneval", "limt": 3}, "evals.chat: unknown key 'limt' (did you mean 'limit'?)"),
    ({"benchmark": "humaneval", "limit": 0}, "evals.chat: 'limit' must be a whole number > 0, got 0"),
    ({"benchmark": "humaneval", "prompt_format": "xml"}, "evals.chat: 'prompt_format' must be raw or chat, got 'xml'"),
    ({"limit": 3}, "evals.chat: 'benchmark' is required"),
    ({"benchmark": "mt-bench", "judge": "/no/such/judge", "data": "DATA"}, "/no/such/judge: model not found"),
    ({"benchmark": "mt-bench", "judge": "JUDGE", "data": "/no/such/data"}, "/no/such/data: no such MT-Bench data"),
    (7, "evals.chat: an evaluation set is a file of rows or {benchmark: humaneval | mt-bench, ...}, got 7"),
])
def test_a_bad_benchmark_set_stops_the_pipeline_before_anything_trains(tmp_path, tiny_model_dir, capsys, chat,
                                                                      message):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows("x", 4))
    folder = str(benchmark_evals(tmp_path, "unused")["chat"]["data"])
    if isinstance(chat, dict):
        chat = {k: {"DATA": folder, "JUDGE": str(tiny_model_dir)}.get(v, v) for k, v in chat.items()}
    plan = write_plan(tmp_path, model=str(tiny_model_dir), evals={"chat": chat},
                      stages=[{"name": "one", "method": "sft", "data": [str(data)], "max_steps": 1}])
    assert main(["pipeline", plan]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "pipe").exists()
