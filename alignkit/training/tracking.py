"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases and MLflow get the rows of metrics.jsonl.

`MetricsLog` hands every row it writes to a `Tracking` fan-out, so the trackers see the same metric names and
steps as the file. Only the main process opens one (the recipes give non-main processes no MetricsLog). Where
each tracker writes:

| tracker     | where                                                                                 |
|-------------|---------------------------------------------------------------------------------------|
| tensorboard | RUN/tensorboard/ event files; the resolved config as hparams and as a text summary     |
| wandb       | RUN/wandb/; offline unless WANDB_MODE, WANDB_API_KEY or a netrc login say otherwise    |
| mlflow      | MLFLOW_TRACKING_URI when set, else a file store RUN/mlruns/ (experiment "alignkit")   |

The run ids of W&B and MLflow are kept in RUN/tracking.json, so `--resume` continues the same tracked run.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any

from alignkit.errors import RunError, UserError
from alignkit.log import log

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "tracking.json"


def require_packages(report_to: list[str]) -> None:
    """Refuse a tracker whose package is absent, naming the extra that installs it (before any model loads)."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"report_to {name} needs the {PACKAGES[name]} package: pip install 'alignkit[{name}]'")


def scalars(row: dict) -> dict[str, float]:
    """The row's plottable numbers: `step` is the x axis, flags (skipped) and nulls are left out."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(config: dict) -> dict[str, Any]:
    """Trackers take scalars as parameters: lists and None become text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class TensorBoardTracker:
    def __init__(self, out: Path, config: dict):
        import torch.utils.tensorboard  # noqa: F401 - fails here, before training, if tensorboard cannot load

        self.folder, self.config = out / "tensorboard", config
        self.writer = None

    def open(self, first_step: int) -> None:
        """The writer starts at the first logged step: after a resume, TensorBoard drops the older events from
        that step on (purge_step), so redone steps are not shown twice."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=first_step)
        for summary in hparams(flat_params(self.config), {}):  # the HPARAMS tab's table, no separate sub-run
            self.writer.file_writer.add_summary(summary)
        text = "\n".join(f"    {k}: {v}" for k, v in self.config.items())  # indented: markdown shows it verbatim
        self.writer.add_text("config", text, global_step=first_step)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            self.open(step)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def wandb_configured() -> bool:
    """True when the user chose a W&B mode or logged in; otherwise runs stay offline (no network needed)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    def __init__(self, out: Path, config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=out.name, dir=str(out),
                              config=config, id=run_id, resume="allow" if run_id else None,
                              mode=None if wandb_configured() else "offline",
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out: Path, config: dict, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps the file store only on request; it needs no server or database, which suits a run dir
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignkit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            params = [Param(k, str(v)) for k, v in flat_params(config).items()]
            self.client.log_batch(run_id, params=params)
        self.run_id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracking:
    """The fan-out: each row goes to every tracker; closed at the end of the run or, after a crash, at exit."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.closed = False
        atexit.register(self.close)

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values and "step" in row:
            for tracker in list(self.trackers):
                self.guarded(tracker, tracker.log, values, int(row["step"]))

    def guarded(self, tracker, call, *args) -> None:
        """A tracker that fails (a server gone, a full disk) is dropped with one line; training and
        metrics.jsonl go on."""
        try:
            call(*args)
        except Exception as err:  # noqa: BLE001 - any tracker failure must not stop the run
            self.trackers.remove(tracker)
            log(f"warning: {type(tracker).__name__} stopped reporting ({' '.join(str(err).split())}); "
                "metrics.jsonl keeps every row")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for tracker in list(self.trackers):
            self.guarded(tracker, tracker.close)


def open_tracking(cfg, out: Path) -> Tracking | None:
    """The trackers `cfg.report_to` names, with the resolved config as parameters; None when there are none."""
    if not cfg.report_to:
        return None
    require_packages(cfg.report_to)
    config = dataclasses.asdict(cfg)
    ids_path = out / IDS_FILE
    ids = json.loads(ids_path.read_text()) if cfg.resume and ids_path.is_file() else {}
    trackers: list = []
    for name in cfg.report_to:
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(out, config))
            elif name == "wandb":
                trackers.append(WandbTracker(out, config, ids.get("wandb")))
            else:
                trackers.append(MlflowTracker(out, config, ids.get("mlflow")))
        except Exception as err:  # noqa: BLE001 - whatever the tracker raises, the user gets one line
            raise RunError(f"report_to {name}: could not start ({' '.join(str(err).split())[:300]}); "
                           f"run without it or fix its settings") from None
    ids.update({name: t.run_id for name, t in zip(cfg.report_to, trackers, strict=True) if hasattr(t, "run_id")})
    if ids:
        ids_path.write_text(json.dumps(ids))
    return Tracking(trackers)
