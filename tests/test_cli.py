"""The command line: flags and YAML merge, --help lists every field, bad input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignkit.cli import main
from alignkit.config import (
    ChatConfig,
    DemoConfig,
    DPOConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PrefsConfig,
    ReportConfig,
    SFTConfig,
    fields_of,
)
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Hello", "completion": "hello there"}, {"prompt": "Add 12 and 30.", "completion": "42"}]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def data(tmp_path):
    return str(write_jsonl(tmp_path / "rows.jsonl", ROWS))


@pytest.mark.parametrize(("command", "config_cls"), [("sft", SFTConfig), ("dpo", DPOConfig),
                                                     ("prefs", PrefsConfig), ("demo", DemoConfig),
                                                     ("generate", GenerateConfig), ("export", ExportConfig),
                                                     ("report", ReportConfig), ("eval", EvalConfig),
                                                     ("chat", ChatConfig)])
def test_help_lists_every_field_with_its_default(capsys, command, config_cls):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in fields_of(config_cls):
        assert f"--{name.replace('_', '-')}" in text, name
    if command not in ("export", "report"):
        assert "(default: smollm2-135m-instruct)" in text
    if command in ("sft", "dpo"):
        assert "(default: 1024)" in text
    if command == "dpo":
        assert "(default: 0.1)" in text and "(default: ['sigmoid'])" in text


def test_flags_override_yaml_and_both_spellings_work(tmp_path, tiny_model_dir, data, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {data}\nmax_length: 64\nlr: 0.001\nmax_steps: 2\n"
                   "dtype: fp32\nbatch_size: 2\n")
    code, err = run_cli(capsys, "sft", "--config", str(cfg), "--max_length", "128", "--lr", "0.002",
                        "--output-dir", str(tmp_path / "out"), "--save-steps", "1", "--lora")
    assert code == 0, err
    import yaml

    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["max_length"] == 128 and resolved["lr"] == 0.002 and resolved["lora"] is True
    assert resolved["max_steps"] == 2 and resolved["data"] == [data]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rows"]["used"] == 2
    assert (tmp_path / "out" / "checkpoints" / "step-1" / "optimizer.pt").is_file()
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "step-2"


@pytest.mark.parametrize(("yaml_text", "flags", "message"), [
    ("learning_rate: 0.1\n", [], "cfg.yaml: unknown key 'learning_rate'"),
    ("max_lenght: 12\n", [], "cfg.yaml: unknown key 'max_lenght' (did you mean 'max_length'?)"),
    ("lr: fast\n", [], "cfg.yaml: 'lr' must be a number, got 'fast'"),
    ("", ["--lr", "0"], "'lr' must be > 0, got 0.0"),
    ("", ["--batch-size", "0"], "'batch_size' must be > 0, got 0"),
    ("", ["--lrr", "0.1"], "unknown option --lrr (did you mean '--lr'?)"),
    ("", ["--dtype", "fp16"], "'dtype' must be one of auto, fp32, bf16, got 'fp16'"),
    ("", ["--lora", "maybe"], "'lora' must be true or false, got 'maybe'"),
    ("[1, 2]\n", [], "cfg.yaml: a config must be a mapping"),
    ("lr: [\n", [], "cfg.yaml:2: not valid YAML"),
])
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, data, capsys, yaml_text, flags, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    code, err = run_cli(capsys, "sft", "--config", str(cfg), "--data", data, *flags)
    assert code == 2
    assert err.startswith("alignkit: error: ") and err.count("\n") == 1, err
    assert message in err


def test_missing_data_file_and_a_model_path_that_is_not_a_model(tmp_path, tiny_model_dir, data, capsys):
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, "sft", "--model", str(tiny_model_dir), "--data", str(tmp_path / "no.jsonl"),
                        "--output-dir", out)
    assert code == 2 and "no.jsonl: data file not found" in err and err.count("\n") == 1
    code, err = run_cli(capsys, "sft", "--model", str(tmp_path), "--data", data, "--output-dir", out + "2")
    assert code == 2 and "not a model folder (no config.json)" in err
    code, err = run_cli(capsys, "sft", "--model", str(tmp_path / "nothing"), "--data", data, "--output-dir", out)
    assert code == 2 and "model not found" in err


def test_bad_row_stops_before_training_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Hi", "completion": "Hello"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    code, err = run_cli(capsys, "sft", "--model", str(tiny_model_dir), "--data", str(data),
                        "--output-dir", str(tmp_path / "out"))
    assert code == 2 and f"{data}:2: no assistant turn to train on" in err
    assert not (tmp_path / "out" / "final").exists()


def test_output_dir_holding_a_run_is_refused_without_overwrite(tmp_path, tiny_model_dir, data, capsys):
    args = ["sft", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(tmp_path / "out"),
            "--max-steps", "1", "--dtype", "fp32"]
    assert run_cli(capsys, *args)[0] == 0
    code, err = run_cli(capsys, *args)
    assert code == 2 and "already holds a run" in err
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()  # nothing lost
    assert run_cli(capsys, *args, "--overwrite")[0] == 0


def test_only_the_newest_checkpoints_are_kept(tmp_path, tiny_model_dir, data, capsys):
    code, err = run_cli(capsys, "sft", "--model", str(tiny_model_dir), "--data", data, "--output-dir",
                        str(tmp_path / "out"), "--max-steps", "5", "--batch-size", "1", "--save-steps", "1",
                        "--save-total-limit", "2", "--dtype", "fp32")
    assert code == 0, err
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-4", "step-5"]
    assert (checkpoints / "latest").read_text() == "step-5"


def test_no_data_is_refused_before_any_model_is_loaded(capsys):
    code, err = run_cli(capsys, "sft", "--model", "smollm2-135m-instruct")
    assert code == 2 and "no training data: set 'data'" in err


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "alignkit", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("alignkit ")


def test_overwrite_never_deletes_a_run_before_the_inputs_pass_their_checks(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "out"
    base = ["sft", "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "1", "--dtype", "fp32"]
    # --save-last: a checkpoint of the last step, for the --resume below to check against
    assert run_cli(capsys, *base, "--data", data, "--save-last")[0] == 0
    code, err = run_cli(capsys, *base, "--data", str(tmp_path / "missing.jsonl"), "--overwrite")
    assert code == 2 and "missing.jsonl: data file not found" in err
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["overwrite"] is False and saved["resume"] is False  # re-using the file never wipes a run
    code, err = run_cli(capsys, *base, "--data", data, "--resume", "--lora")
    assert code == 2 and "holds full weights; resume with lora: false" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed", "-1"], "'seed' must be in [0, 2**32), got -1"),
    (["--lr", "-1e-4"], "'lr' must be > 0, got -0.0001"),
    (["--learning-rate", "0.1"], "unknown option --learning-rate (did you mean '--lr'?)"),
])
def test_more_bad_flags(tmp_path, data, capsys, flags, message):
    code, err = run_cli(capsys, "sft", "--data", data, "--output-dir", str(tmp_path / "o"), *flags)
    assert code == 2 and message in err and err.count("\n") == 1


def test_output_dir_that_is_a_file_and_rows_missing_their_completion(tmp_path, tiny_model_dir, data, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "sft", "--model", str(tiny_model_dir), "--data", data, "--output-dir",
                        str(tmp_path / "afile"))
    assert code == 2 and "output_dir is a file" in err
    rows = tmp_path / "prompts.json"
    rows.write_text('{"prompt": "Hello"}\n{"prompt": "Hi"}\n')  # JSON Lines in a .json file
    code, err = run_cli(capsys, "sft", "--model", str(tiny_model_dir), "--data", str(rows), "--output-dir",
                        str(tmp_path / "o"))
    assert code == 2 and f"{rows}:1: missing field 'completion'" in err
    assert not (tmp_path / "o").exists()  # nothing is created for a run that never started
