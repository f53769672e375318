"""The dashboard's HTTP server: nothing outside the runs folder, run status rules, metrics polling, form checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.ui import runs
from alignkit.ui.server import GET_ROUTES, POST_ROUTES, TOKEN_HEADER, bind_warning, serve
from tests.conftest import write_jsonl

TOKENS: dict[str, str] = {}  # base URL -> that server's token, which get() and post() send unless told otherwise

SFT_ROWS = [{"step": s, "epoch": s / 4, "loss": 3.0 - 0.4 * s, "lr": 1e-3 * (1 - s / 5), "grad_norm": 1.5,
             "tokens_per_s": 100.0 + s} for s in range(1, 5)] + [{"step": 4, "epoch": 1.0, "eval/loss": 2.1,
                                                                   "eval/ppl": 8.2}]
DPO_ROWS = [{"step": s, "loss": 0.69 - 0.05 * s, "lr": 5e-4, "rewards/chosen": 0.02 * s, "rewards/rejected": -0.03 * s,
             "rewards/margins": 0.05 * s, "rewards/accuracies": min(1.0, 0.5 + 0.1 * s)} for s in range(1, 7)]


def write_run(folder: Path, rows: list[dict], config: dict, summary: dict | None = None) -> Path:
    """A run folder as a recipe leaves it: metrics.jsonl, config.yaml and (when finished) summary.json."""
    import yaml

    folder.mkdir(parents=True)
    write_jsonl(folder / "metrics.jsonl", rows)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_old(path: Path) -> None:
    past = time.time() - 3600
    os.utime(path, (past, past))


@pytest.fixture
def dashboard(tmp_path):
    """A served runs folder with a finished SFT run and a resumable DPO run; yields (base url, runs folder)."""
    root = tmp_path / "runs"
    write_run(root / "sft-a", SFT_ROWS, {"model": "m", "max_steps": 4, "lr": 1e-3}, {"final_loss": 1.4, "steps": 4})
    dpo = write_run(root / "dpo-b", DPO_ROWS, {"model": "m", "beta": 0.1, "max_steps": 100})
    (dpo / "checkpoints").mkdir()
    (dpo / "checkpoints" / "latest").write_text("step-6")
    (dpo / "run.pid").write_text(str(dead_pid()))
    make_old(dpo / "metrics.jsonl")
    server = serve(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    TOKENS[base] = server.token
    yield base, root
    server.shutdown()
    server.server_close()


def with_token(url: str, headers: dict | None) -> dict:
    base = next((b for b in TOKENS if url.startswith(b + "/")), None)
    return {**({TOKEN_HEADER: TOKENS[base]} if base and TOKENS[base] else {}), **(headers or {})}


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=with_token(url, headers))
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: dict, content_type: str = "application/json", origin: str | None = None,
         headers: dict | None = None):
    headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {}), **(headers or {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=with_token(url, headers),
                                     method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_no_endpoint_reads_or_writes_outside_the_runs_folder(dashboard, tmp_path):
    base, root = dashboard
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    outside_run = write_run(tmp_path / "elsewhere", SFT_ROWS, {"model": "m"})
    (root / "sft-a" / "link.txt").symlink_to(secret)
    (root / "escape").symlink_to(outside_run, target_is_directory=True)
    assert get(f"{base}/api/file?run=sft-a&path=config.yaml")[0] == 200  # the same request, inside: allowed
    refused = [f"{base}/api/file?run=sft-a&path=../../secret.txt",
               f"{base}/api/file?run=sft-a&path=..%2F..%2Fsecret.txt",
               f"{base}/api/file?run=sft-a&path={secret}", f"{base}/api/file?run=sft-a&path=link.txt",
               f"{base}/api/file?run=../elsewhere&path=config.yaml", f"{base}/api/metrics?run=escape",
               f"{base}/api/run?run={outside_run}", f"{base}/api/file?run=sft-a&path=plots%5C..%5C..%5Csecret.txt"]
    for url in refused:
        code, body = get(url)
        assert code == 403 and b"private" not in body, url
    assert get(f"{base}/../secret.txt")[0] == 404
    names = [r["name"] for r in json.loads(get(f"{base}/api/runs")[1])["runs"]]
    assert sorted(names) == ["dpo-b", "sft-a"]  # the symlinked folder is not followed
    code, body = post(f"{base}/api/launch", {"method": "sft", "name": "../escaped", "values": {"data": [str(secret)]}})
    assert code == 400 and "run name" in body["error"]
    code, body = post(f"{base}/api/stop", {"run": "../elsewhere"})
    assert code == 403
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()


def test_status_rules(tmp_path):
    root = tmp_path / "runs"
    running = write_run(root / "running", SFT_ROWS, {})
    (running / "run.pid").write_text(str(os.getpid()))  # this test's process: alive and older than the file
    fresh = write_run(root / "fresh-no-pid", SFT_ROWS, {})  # a run from elsewhere, still writing metrics
    finished = write_run(root / "finished", SFT_ROWS, {}, {"steps": 4})
    (finished / "run.pid").write_text(str(dead_pid()))
    resumable = write_run(root / "resumable", SFT_ROWS, {})
    (resumable / "checkpoints").mkdir()
    (resumable / "checkpoints" / "latest").write_text("step-2")
    (resumable / "run.pid").write_text(str(dead_pid()))
    stage = write_run(root / "pipeline-stage", SFT_ROWS, {}, {"steps": 4})
    (stage / "run.pid").write_text(str(os.getpid()))  # a pipeline's process goes on to the next stage
    stale = write_run(root / "stale-no-pid", SFT_ROWS, {})
    make_old(stale / "metrics.jsonl")
    reused = write_run(root / "reused-pid", SFT_ROWS, {})
    (reused / "run.pid").write_text(str(os.getpid()))
    make_old(reused / "run.pid")  # written before this process started: the pid now belongs to someone else
    make_old(reused / "metrics.jsonl")
    expected = {"running": "running", "fresh-no-pid": "running", "finished": "finished", "resumable": "resumable",
                "pipeline-stage": "finished", "stale-no-pid": "failed", "reused-pid": "failed"}
    assert {name: runs.status(root / name) for name in expected} == expected
    assert fresh.is_dir() and sorted(runs.discover(root)) == sorted(expected)


def test_metrics_are_sent_incrementally_and_again_after_a_rewrite(dashboard):
    base, root = dashboard
    path = root / "sft-a" / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')  # a row being written
    first = json.loads(get(f"{base}/api/metrics?run=sft-a&offset=0")[1])
    assert [r["step"] for r in first["rows"]] == [1] and not first["reset"]
    with open(path, "a") as handle:
        handle.write('ss": 1.5}\n' + json.dumps({"step": 3, "loss": 1.2}) + "\n")
    second = json.loads(get(f"{base}/api/metrics?run=sft-a&offset={first['offset']}")[1])
    assert [r["step"] for r in second["rows"]] == [2, 3] and second["offset"] == path.stat().st_size
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # a resume rewrote the file shorter
    third = json.loads(get(f"{base}/api/metrics?run=sft-a&offset={second['offset']}")[1])
    assert third["reset"] and [r["step"] for r in third["rows"]] == [1]
    assert get(f"{base}/api/metrics?run=sft-a&offset=x")[0] == 400
    assert get(f"{base}/api/metrics?run=missing")[0] == 404


def test_run_list_and_detail(dashboard):
    base, root = dashboard
    (root / "sft-a" / "plots").mkdir()
    (root / "sft-a" / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    listed = {r["name"]: r for r in json.loads(get(f"{base}/api/runs")[1])["runs"]}
    assert listed["sft-a"]["status"] == "finished" and listed["sft-a"]["method"] == "sft"
    assert listed["sft-a"]["step"] == 4 and listed["sft-a"]["max_steps"] == 4
    assert listed["dpo-b"]["status"] == "resumable" and listed["dpo-b"]["method"] == "dpo"
    detail = json.loads(get(f"{base}/api/run?run=sft-a")[1])
    assert detail["text"] == ["config.yaml", "summary.json"] and detail["images"] == ["plots/loss.png"]
    code, png = get(f"{base}/api/file?run=sft-a&path=plots/loss.png")
    assert code == 200 and png.startswith(b"\x89PNG")
    (root / "sft-a" / "launch.log").write_text("start\n" + "x" * 1000 + "\nlast line\n")
    assert get(f"{base}/api/file?run=sft-a&path=launch.log&tail=10") == (200, b"last line\n")
    page = get(f"{base}/")[1]
    assert b"<canvas" in page and b"/api/runs" in page


def test_the_form_is_checked_by_the_cli_rules(dashboard, tmp_path, tiny_model_dir):
    base, root = dashboard
    data = str(write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}]))
    form = {"method": "sft", "name": "new", "values": {"model": str(tiny_model_dir), "data": [data], "lr": "1e-4"}}
    assert post(f"{base}/api/validate", form) == (200, {"ok": True})
    cases = [({"values": {**form["values"], "lr": "fast"}}, "form: 'lr' must be a number, got 'fast'"),
             ({"values": {**form["values"], "lr": "-1"}}, "'lr' must be > 0, got -1.0"),
             ({"extra": "max_lenght: 12"}, "form: unknown key 'max_lenght' (did you mean 'max_length'?)"),
             ({"extra": "output_dir: /tmp/x"}, "form: 'output_dir' is set by the dashboard"),
             ({"values": {**form["values"], "data": [str(tmp_path / "nope.jsonl")]}}, "nope.jsonl"),
             ({"method": "ppo"}, "form: 'method' must be sft or dpo, got 'ppo'"),
             ({"name": "sft-a"}, "form: sft-a already exists"),
             ({"method": "dpo", "values": {**form["values"], "reference": "adapter"}},
              "reference 'adapter' needs lora: true")]
    for change, message in cases:
        code, body = post(f"{base}/api/validate", {**form, **change})
        assert code == 400 and message in body["error"], (change, body)
        assert "\n" not in body["error"]
    assert not (root / "new").exists()


def test_posts_must_be_json_from_the_same_origin(dashboard):
    base, _ = dashboard
    form = {"method": "sft", "name": "x", "values": {}}
    assert post(f"{base}/api/launch", form, content_type="text/plain")[0] == 403
    assert post(f"{base}/api/launch", form, origin="http://evil.example")[0] == 403
    assert post(f"{base}/api/stop", {"run": "sft-a"}, origin=base)[0] == 400  # same origin: answered


def every_route(base: str) -> list[tuple[str, str]]:
    """(method, url) for every route the server has, with arguments naming a real run where one is taken."""
    query = {"/api/metrics": "?run=sft-a", "/api/run": "?run=sft-a", "/api/file": "?run=sft-a&path=config.yaml"}
    return ([("GET", base + path + query.get(path, "")) for path in GET_ROUTES] +
            [("POST", base + path) for path in POST_ROUTES])


def call(method: str, url: str, headers: dict | None = None) -> tuple[int, bytes]:
    if method == "GET":
        return get(url, headers)
    body = {"method": "sft", "name": "from-elsewhere", "run": "dpo-b", "values": {"model": "m", "data": ["x"]}}
    code, answer = post(url, body, headers=headers)
    return code, json.dumps(answer).encode()


def test_every_route_refuses_a_foreign_host_and_answers_loopback_names(dashboard):
    base, root = dashboard
    port = base.rsplit(":", 1)[1]
    assert len(every_route(base)) == len(GET_ROUTES) + len(POST_ROUTES) == 11
    for host in (f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost:{int(port) + 1}", ""):
        for method, url in every_route(base):
            # a DNS-rebinding page sends its own name as Host, and as Origin when it sends one at all
            for origin in ({}, {"Origin": f"http://{host}"}):
                code, body = call(method, url, {"Host": host, **origin})
                assert code == 403 and b"sft-a" not in body and b"final_loss" not in body, (host, url, origin)
    assert not (root / "from-elsewhere").exists()
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        code, body = get(f"{base}/api/runs", {"Host": host, "Origin": f"http://{host}"})
        assert code == 200 and b"sft-a" in body, host


def test_every_api_route_needs_the_token_and_the_page_does_not(dashboard):
    base, root = dashboard
    for method, url in every_route(base):
        for token in ({TOKEN_HEADER: ""}, {TOKEN_HEADER: TOKENS[base][:-1]}, {TOKEN_HEADER: TOKENS[base] + "x"}):
            code, body = call(method, url, token)
            if "/api/" in url:
                assert code == 401 and b"token" in body and b"sft-a" not in body, (url, token)
            else:
                assert code == 200 and b"<canvas" in body
        assert call(method, url)[0] != 401, url
    assert not (root / "from-elsewhere").exists()


def test_each_server_has_its_own_token_in_the_url_it_prints(tmp_path):
    first, second = serve(tmp_path, "127.0.0.1", 0), serve(tmp_path, "::1", 0)
    try:
        assert first.token != second.token and len(first.token) >= 32
        assert first.url() == f"http://127.0.0.1:{first.server_address[1]}/?token={first.token}"
        assert second.url() == f"http://[::1]:{second.server_address[1]}/?token={second.token}"
    finally:
        first.server_close()
        second.server_close()


def test_no_auth_serves_without_the_token_on_loopback_only(tmp_path, capsys):
    from alignkit.cli import main

    server = serve(tmp_path, "127.0.0.1", 0, auth=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert server.url() == base + "/" and get(f"{base}/api/runs")[0] == 200
        assert get(f"{base}/api/runs", {"Host": "evil.example"})[0] == 403  # the Host check stays
    finally:
        server.shutdown()
        server.server_close()
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(UserError, match=f"--no-auth is refused with --host {host}"):
            serve(tmp_path, host, 0, auth=False)
    assert main(["ui", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", "0", "--no-auth"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignkit: error: --no-auth is refused")


def test_the_dashboard_cannot_make_a_run_execute_code_or_write_elsewhere(dashboard, tmp_path, tiny_model_dir):
    base, root = dashboard
    data = str(write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}]))
    form = {"method": "sft", "name": "bounded", "values": {"model": str(tiny_model_dir), "data": [data]}}
    assert post(f"{base}/api/validate", form) == (200, {"ok": True})
    cases = [({"values": {**form["values"], "trust_remote_code": True}}, "'trust_remote_code' cannot be set"),
             ({"extra": "trust_remote_code: yes"}, "'trust_remote_code' cannot be set"),
             ({"extra": "reward: os:system"}, "'reward: os:system' names Python code to import"),
             ({"extra": "output_dir: /tmp/x"}, "'output_dir' is set by the dashboard"),
             ({"extra": "output_dir: ../x"}, "'output_dir' is set by the dashboard"),
             ({"name": "../x"}, "run name"), ({"name": "/tmp/x"}, "run name")]
    for change, message in cases:
        for endpoint in ("validate", "launch"):
            code, body = post(f"{base}/api/{endpoint}", {**form, **change})
            assert code == 400 and message in body["error"], (change, body)
    assert sorted(p.name for p in root.iterdir()) == ["dpo-b", "sft-a"] and not (tmp_path / "x").exists()
    (root / "dpo-b" / "config.yaml").write_text("model: m\ntrust_remote_code: true\n")  # written by a CLI run
    code, body = post(f"{base}/api/resume", {"run": "dpo-b", "method": "dpo"})
    assert code == 400 and "dpo-b/config.yaml: 'trust_remote_code' cannot be set" in body["error"]
    assert not (root / "dpo-b" / "launch.json").exists()


def test_a_non_loopback_host_gets_a_warning():
    assert bind_warning("127.0.0.1") is None and bind_warning("::1") is None and bind_warning("localhost") is None
    assert "learns the token" in bind_warning("0.0.0.0") and "192.168.1.20" in bind_warning("192.168.1.20")


def test_a_bad_port_is_a_user_error(tmp_path, capsys):
    from alignkit.cli import main

    assert main(["ui", "--runs", str(tmp_path), "--port", "70000"]) == 2
    assert "'port' must be in [0, 65535], got 70000" in capsys.readouterr().err


def test_help_lists_the_ui_flags_with_their_defaults(capsys):
    from alignkit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["ui", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    for flag, default in (("--runs", "runs"), ("--port", "7860"), ("--host", "127.0.0.1"), ("--no-auth", "False")):
        assert flag in text and f"(default: {default})" in text, flag


def test_a_launched_run_that_fails_is_marked_failed_with_its_error_in_the_log(dashboard, tmp_path):
    base, root = dashboard
    data = str(write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}]))
    form = {"method": "sft", "name": "broken", "values": {"model": str(tmp_path / "no-such-model"), "data": [data]}}
    assert post(f"{base}/api/launch", form) == (200, {"ok": True, "run": "broken"})
    launched = root / "broken" / "launch.json"
    deadline = time.monotonic() + 120
    while "returncode" not in json.loads(launched.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(launched.read_text())["returncode"] == 2
    detail = json.loads(get(f"{base}/api/run?run=broken")[1])
    assert detail["status"] == "failed" and detail["returncode"] == 2 and "launch.log" in detail["text"]
    log = get(f"{base}/api/file?run=broken&path=launch.log")[1].decode()
    assert log.count("alignkit: error:") == 1 and "no-such-model" in log
    assert post(f"{base}/api/stop", {"run": "broken"})[1]["error"] == (
        "broken is not a run this dashboard started and is still running")
