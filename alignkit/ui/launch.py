"""Starting and stopping runs from the dashboard: the form becomes a config checked by the CLI's own rules.

A launch writes RUN/launch.yaml (the resolved config) and RUN/launch.json (pid, command, exit code when done),
and starts `python -m alignkit sft|dpo --config RUN/launch.yaml --output-dir RUN` in its own session with its
output in RUN/launch.log, so closing the dashboard leaves the run going. Stop sends SIGINT: the recipe finishes
its step, saves a checkpoint and exits with 130 (the run is then resumable).

What the page may ask for is bounded, for launches and resumes alike: no `trust_remote_code` (it runs Python
shipped in a model folder), no reward given as `module:function` (it imports and calls any module), and the
run writes only into RUNS/NAME. Such runs are started from the command line, where the user types them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from alignkit.config import DPOConfig, SFTConfig, build_config, fields_of, save_yaml
from alignkit.errors import UserError
from alignkit.ui.runs import inside

METHODS = {"sft": SFTConfig, "dpo": DPOConfig}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SET_BY_DASHBOARD = ("output_dir", "resume", "overwrite")
CODE_REFERENCE = re.compile(r"^\s*[A-Za-z_][\w.]*:[A-Za-z_]\w*\s*$")
FALSE = ("false", "no", "off", "0", "none", "")


def form_fields() -> dict:
    """Every field of each method with its default, meaning and choices: the page builds its form from these."""
    described = {}
    for method, config_cls in METHODS.items():
        fields = {}
        for name, f in fields_of(config_cls).items():
            if name in SET_BY_DASHBOARD:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields[name] = {"default": default, "help": f.metadata["help"], "choices": f.metadata.get("choices")}
        described[method] = fields
    return described


def form_values(form: dict) -> dict:
    """The form's fields plus its free YAML; empty fields keep their defaults."""
    values = {k: v for k, v in (form.get("values") or {}).items() if v not in ("", None, [])}
    extra_text = form.get("extra") or ""
    try:
        extra = yaml.safe_load(extra_text) if extra_text.strip() else {}
    except yaml.YAMLError as err:
        raise UserError(f"form: extra fields are not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(extra, dict):
        raise UserError("form: extra fields must be YAML lines of field: value")
    values.update(extra)
    for name in SET_BY_DASHBOARD:
        if name in values:
            raise UserError(f"form: '{name}' is set by the dashboard (runs go to RUNS/NAME and start fresh)")
    refuse_code(values, "form")
    return values


def refuse_code(values: dict, source: str) -> None:
    """UserError for the settings that would let the page run code of its choosing (see the module's note)."""
    if str(values.get("trust_remote_code", False)).strip().lower() not in FALSE:
        raise UserError(f"{source}: 'trust_remote_code' cannot be set from the dashboard (it runs code from the "
                        "model folder); start such a run from the command line")
    for name, value in values.items():
        if "reward" in name and isinstance(value, str) and CODE_REFERENCE.match(value):
            raise UserError(f"{source}: '{name}: {value.strip()}' names Python code to import; the dashboard does "
                            "not run reward functions given as module:function")


class Launcher:
    def __init__(self, root: Path):
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def check(self, form: dict):
        """(method, config) from the form, or UserError with the CLI's own message."""
        method = form.get("method")
        if method not in METHODS:
            raise UserError(f"form: 'method' must be sft or dpo, got {method!r}")
        name = str(form.get("name") or "")
        if not NAME.match(name):
            raise UserError(f"form: run name {name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
        folder = inside(self.root, name)
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"form: {name} already exists under the runs folder; pick another name")
        config = build_config(METHODS[method], {**form_values(form), "output_dir": str(folder)}, "form")
        if Path(config.output_dir).resolve() != folder or folder.parent != self.root:
            raise UserError(f"form: the run must write into {self.root}/NAME")
        from alignkit.data.sources import require

        for path in config.data + config.eval_data:
            require(Path(path))
        return method, config

    def launch(self, form: dict) -> str:
        method, config = self.check(form)
        folder = Path(config.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_yaml(config, folder / "launch.yaml")
        self._start(str(form["name"]), method, folder, ["--config", str(folder / "launch.yaml")])
        return str(form["name"])

    def resume(self, name: str, method: str) -> None:
        """Continue a stopped run from its newest checkpoint with the config it saved."""
        folder = inside(self.root, name)
        if method not in METHODS or not (folder / "config.yaml").is_file():
            raise UserError(f"{name}: no config.yaml to resume from")
        if not (folder / "checkpoints" / "latest").is_file():
            raise UserError(f"{name}: no checkpoint to resume from")
        saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        refuse_code(saved if isinstance(saved, dict) else {}, f"{name}/config.yaml")
        self._start(name, method, folder, ["--config", str(folder / "config.yaml"), "--resume"])

    def _start(self, name: str, method: str, folder: Path, args: list[str]) -> None:
        command = [sys.executable, "-m", "alignkit", method, *args, "--output-dir", str(folder)]
        with self.lock:
            running = self.processes.get(name)
            if running is not None and running.poll() is None:
                raise UserError(f"{name} is already running")
            with open(folder / "launch.log", "ab") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.processes[name] = process
        record = {"pid": process.pid, "method": method, "command": command, "started": time.time()}
        (folder / "launch.json").write_text(json.dumps(record))
        threading.Thread(target=self._wait, args=(process, folder, record), daemon=True).start()

    def _wait(self, process: subprocess.Popen, folder: Path, record: dict) -> None:
        """Reap the run and keep its exit code beside it (0 done, 2 bad input, 130 stopped and saved)."""
        code = process.wait()
        (folder / "launch.json").write_text(json.dumps({**record, "returncode": code, "ended": time.time()}))

    def stop(self, name: str) -> None:
        """SIGINT, as Ctrl-C would: the run saves a checkpoint at the end of its step."""
        with self.lock:
            process = self.processes.get(name)
        if process is None or process.poll() is not None:
            raise UserError(f"{name} is not a run this dashboard started and is still running")
        os.kill(process.pid, signal.SIGINT)
