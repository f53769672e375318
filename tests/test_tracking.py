"""report_to: TensorBoard, MLflow and W&B receive the rows of metrics.jsonl under the same names and steps."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.training import tracking
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Hello", "completion": "hello there"}, {"prompt": "Add 12 and 30.", "completion": "42"},
        {"prompt": "What is the capital of France?", "completion": "Paris."},
        {"prompt": "Write a short poem.", "completion": "The sea."}]
INSTALLED = [name for name in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(name)]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One 3-step SFT run with eval rows, reported to every tracker that is installed."""
    if not INSTALLED:
        pytest.skip("none of tensorboard, mlflow, wandb is installed (pip install 'alignkit[dev]')")
    folder = tmp_path_factory.mktemp("tracked")
    data = write_jsonl(folder / "rows.jsonl", ROWS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALIGNKIT_CACHE", str(folder / "cache"))
        for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(name, raising=False)
        code = main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(folder / "run"),
                     "--max-steps", "3", "--batch-size", "2", "--max-length", "64", "--dtype", "fp32",
                     "--eval-fraction", "0.25", "--save-steps", "0", "--report-to", *INSTALLED])
    assert code == 0
    return folder / "run"


def jsonl_values(run: Path) -> dict[tuple[str, int], float]:
    """(metric, step) → value for every number metrics.jsonl holds: what each tracker must hold too."""
    values = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        values.update({(k, row["step"]): v for k, v in tracking.scalars(row).items()})
    return values


def test_tensorboard_events_hold_the_metrics_and_the_config(tracked_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'alignkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    expected = jsonl_values(tracked_run)
    assert {"loss", "lr", "eval/loss", "eval/ppl"} <= set(events.Tags()["scalars"])
    found = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert found.keys() == expected.keys()
    assert all(found[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_file_store_in_the_run_dir_holds_the_metrics_and_params(tracked_run, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'alignkit[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").as_uri())
    run = client.get_run(json.loads((tracked_run / "tracking.json").read_text())["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["max_steps"] == "3" and run.data.params["report_to"].startswith("[")
    expected = jsonl_values(tracked_run)
    found = {(m.key, m.step): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id,
                                                                                                     key)}
    assert found.keys() == expected.keys()
    assert all(found[key] == pytest.approx(value) for key, value in expected.items())


def test_wandb_writes_an_offline_run_in_the_run_dir(tracked_run):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'alignkit[wandb]')")
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = json.loads((tracked_run / "tracking.json").read_text())["wandb"]
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()  # protobuf records: key names are plain bytes
    for key in ("loss", "grad_norm", "tokens_per_s", "eval/ppl", "max_length"):
        assert key.encode() in records, key


def test_a_missing_tracker_package_stops_before_training_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tracking.PACKAGES, "wandb", "alignkit_no_such_package")
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code = main(["sft", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output-dir",
                 str(tmp_path / "out"), "--report-to", "tensorboard", "wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "report_to wandb needs the alignkit_no_such_package package: pip install 'alignkit[wandb]'" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_tracker_is_refused_with_a_suggestion(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code = main(["sft", "--data", str(data), "--report-to", "tensorbord"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'report_to' must be one of tensorboard, wandb, mlflow, got 'tensorbord' (did you mean 'tensorboard'?)" \
        in err


def test_rows_without_a_step_or_numbers_are_not_sent():
    sent = []

    class Recorder:
        def log(self, values, step):
            sent.append((values, step))

        def close(self):
            sent.append("closed")

    fan_out = tracking.Tracking([Recorder()])
    fan_out.log({"step": 2, "loss": None, "skipped": True, "lr": 0.1, "tokens": 7})
    fan_out.log({"note": "no step"})
    fan_out.close()
    fan_out.close()
    assert sent == [({"lr": 0.1, "tokens": 7.0}, 2), "closed"]


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on(capsys):
    received = []

    class Broken:
        def log(self, values, step):
            raise ConnectionError("server\ngone")

        def close(self):
            raise AssertionError("a dropped tracker is not closed")

    class Working:
        def log(self, values, step):
            received.append(step)

        def close(self):
            received.append("closed")

    fan_out = tracking.Tracking([Broken(), Working()])
    fan_out.log({"step": 1, "loss": 1.0})
    fan_out.log({"step": 2, "loss": 0.5})
    fan_out.close()
    assert received == [1, 2, "closed"]
    assert capsys.readouterr().err.splitlines() == [
        "alignkit: warning: Broken stopped reporting (server gone); metrics.jsonl keeps every row"]


def test_resume_continues_the_same_tracked_runs(tmp_path, tiny_model_dir, monkeypatch):
    """Run 3 steps, go back to the step-2 checkpoint, resume: step 3 is redone in the same tracked runs;
    TensorBoard shows it once (purge_step), MLflow holds the redone value beside the first (equal: resume is exact)."""
    report_to = [name for name in INSTALLED if name != "wandb"]  # W&B's offline file is not read back by step
    if not report_to:
        pytest.skip("neither tensorboard nor mlflow is installed (pip install 'alignkit[dev]')")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    data, out = write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "run"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "3",
            "--batch-size", "2", "--max-length", "64", "--dtype", "fp32", "--save-steps", "2", "--save-total-limit",
            "0", "--save-last", "--report-to", *report_to]
    assert main(argv) == 0
    ids = json.loads((out / "tracking.json").read_text()) if (out / "tracking.json").is_file() else {}
    shutil.rmtree(out / "checkpoints" / "step-3")
    (out / "checkpoints" / "latest").write_text("step-2")
    assert main([*argv, "--resume"]) == 0
    expected = jsonl_values(out)
    if "tensorboard" in report_to:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    if "mlflow" in report_to:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
        assert json.loads((out / "tracking.json").read_text())["mlflow"] == ids["mlflow"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss"))
        assert [step for step, _ in history] == [1, 2, 3, 3]  # MLflow keeps both writes of the redone step...
        assert history[2][1] == pytest.approx(history[3][1]) == pytest.approx(expected[("loss", 3)])  # ...equal


def test_dpo_rewards_margins_and_accuracies_reach_tensorboard(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'alignkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = [{"prompt": "Add 12 and 30.", "chosen": "42", "rejected": "41"},
             {"prompt": "Hello", "chosen": "hello there", "rejected": "go away"}]
    data, out = write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "dpo"
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "2", "--batch-size", "2", "--max-length", "64", "--dtype", "fp32", "--save-steps", "0",
                 "--report-to", "tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {key for key, _ in jsonl_values(out)}
    assert {"rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/rejected"} <= tags
