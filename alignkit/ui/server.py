"""`alignkit ui`: a local web dashboard over a runs folder (stdlib HTTP server, one static page).

Endpoints (JSON unless said otherwise); every run name and file path is checked by `runs.inside`, so nothing
outside the runs folder is read or written:

| method | path           | what                                                                        |
|--------|----------------|-----------------------------------------------------------------------------|
| GET    | /              | the page (alignkit/ui/static/index.html)                                    |
| GET    | /api/runs      | every run with its status, method, model, last step                         |
| GET    | /api/metrics   | ?run=NAME&offset=BYTES: metrics.jsonl rows added since offset               |
| GET    | /api/run       | ?run=NAME: status and the names of its text files and PNG plots             |
| GET    | /api/file      | ?run=NAME&path=FILE[&tail=BYTES]: a file of the run (text, JSON or PNG)     |
| GET    | /api/fields    | the SFT and DPO config fields with defaults, meanings and choices           |
| POST   | /api/validate  | {method, name, values, extra}: the CLI's checks; {ok} or {error}            |
| POST   | /api/launch    | the same, then starts the run                                               |
| POST   | /api/stop      | {run}: SIGINT to a run this dashboard started (it saves a checkpoint)       |
| POST   | /api/resume    | {run, method}: continue a resumable run from its newest checkpoint          |

POSTs must be `application/json` and, when the browser sends an Origin, come from this server's own origin:
another web site open in the same browser cannot start runs.
"""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from alignkit.errors import UserError
from alignkit.ui import runs
from alignkit.ui.launch import Launcher, form_fields

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20


class Dashboard(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.root = root
        self.launcher = Launcher(root)


class Handler(BaseHTTPRequestHandler):
    server: Dashboard

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        """Quiet: the page polls every few seconds, which would flood the terminal."""

    # ------------------------------------------------------------ replies

    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, value, status: int = 200) -> None:
        self.send(status, json.dumps(value).encode(), "application/json")

    def fail(self, status: int, message: str) -> None:
        self.send_json({"error": message}, status)

    # ------------------------------------------------------------ dispatch

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        routes = {"/": self.page, "/index.html": self.page, "/api/runs": self.list_runs,
                  "/api/metrics": self.metrics, "/api/run": self.run_detail, "/api/file": self.file,
                  "/api/fields": lambda q: self.send_json(form_fields())}
        self.answer(routes.get(url.path), query)

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        routes = {"/api/validate": self.validate, "/api/launch": self.launch, "/api/stop": self.stop,
                  "/api/resume": self.resume}
        route = routes.get(url.path)
        if route is None:
            return self.fail(HTTPStatus.NOT_FOUND, f"no such endpoint {url.path}")
        refusal = self.refuse_post()
        if refusal:
            return self.fail(HTTPStatus.FORBIDDEN, refusal)
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError:
            return self.fail(HTTPStatus.BAD_REQUEST, "the request body is not JSON")
        self.answer(route, body if isinstance(body, dict) else {})

    def refuse_post(self) -> str | None:
        """Why a POST is refused: not JSON (a cross-site form could send it), too big, or from another origin."""
        if self.headers.get_content_type() != "application/json":
            return "POST bodies must be application/json"
        if int(self.headers.get("Content-Length") or 0) > MAX_BODY:
            return "request body too large"
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            return f"cross-origin request from {origin} refused"
        return None

    def answer(self, route, arguments: dict) -> None:
        """Run a route; refused paths are 403, bad input 400 with the one-line message, missing files 404."""
        if route is None:
            return self.fail(HTTPStatus.NOT_FOUND, f"no such page {urlsplit(self.path).path}")
        try:
            route(arguments)
        except runs.PathRefused as err:
            self.fail(HTTPStatus.FORBIDDEN, str(err))
        except FileNotFoundError as err:
            self.fail(HTTPStatus.NOT_FOUND, str(err))
        except UserError as err:
            self.fail(HTTPStatus.BAD_REQUEST, " ".join(str(err).split()))

    # ------------------------------------------------------------ GET routes

    def page(self, _query: dict) -> None:
        self.send(200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")

    def run_folder(self, name: str | None) -> Path:
        folder = runs.inside(self.server.root, name or "")
        if not any((folder / marker).is_file() for marker in runs.RUN_MARKERS):
            raise FileNotFoundError(f"no run {name!r} in the runs folder")
        return folder

    def list_runs(self, _query: dict) -> None:
        self.send_json({"root": str(self.server.root), "runs": [runs.describe(self.server.root, name)
                                                                for name in runs.discover(self.server.root)]})

    def metrics(self, query: dict) -> None:
        folder = self.run_folder(query.get("run"))
        try:
            offset = max(0, int(query.get("offset", 0)))
        except ValueError:
            raise UserError("offset must be a whole number of bytes") from None
        self.send_json(runs.read_metrics(folder, offset))

    def run_detail(self, query: dict) -> None:
        folder = self.run_folder(query.get("run"))
        launched = runs.read_json(folder / "launch.json")
        self.send_json({**runs.describe(self.server.root, query["run"]), **runs.files_of(folder),
                        "returncode": launched.get("returncode"),
                        "stoppable": query["run"] in self.server.launcher.processes})

    def file(self, query: dict) -> None:
        folder = self.run_folder(query.get("run"))
        target = runs.inside(folder, query.get("path") or "")
        if not target.is_file():
            raise FileNotFoundError(f"no file {query.get('path')!r} in run {query.get('run')!r}")
        kind = mimetypes.guess_type(target.name)[0] or "text/plain"
        if kind.startswith("text/") or target.suffix in (".yaml", ".log", ".jsonl", ".md"):
            kind = "text/plain; charset=utf-8"
        self.send(200, read_tail(target, query.get("tail")), kind)

    # ------------------------------------------------------------ POST routes

    def validate(self, body: dict) -> None:
        self.server.launcher.check(body)
        self.send_json({"ok": True})

    def launch(self, body: dict) -> None:
        self.send_json({"ok": True, "run": self.server.launcher.launch(body)})

    def stop(self, body: dict) -> None:
        self.run_folder(body.get("run"))
        self.server.launcher.stop(body["run"])
        self.send_json({"ok": True})

    def resume(self, body: dict) -> None:
        self.run_folder(body.get("run"))
        self.server.launcher.resume(body["run"], body.get("method", ""))
        self.send_json({"ok": True})


def read_tail(path: Path, tail: str | None) -> bytes:
    """The whole file, or its last `tail` bytes (a long run's log is polled without sending all of it)."""
    if tail is None:
        return path.read_bytes()
    try:
        size = max(0, int(tail))
    except ValueError:
        raise UserError("tail must be a whole number of bytes") from None
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read()


def bind_warning(host: str) -> str | None:
    """The warning printed when the page is reachable from other machines (it has no authentication)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"alignkit: warning: listening on {host}, not loopback: anyone who can reach this address can read "
            "these runs and start or stop runs (there is no authentication)")


def serve(root: Path, host: str, port: int) -> Dashboard:
    """The bound server (not yet serving); port 0 picks a free one (tests use that)."""
    if not 0 <= port < 65536:
        raise UserError(f"'port' must be in [0, 65535], got {port}")
    root.mkdir(parents=True, exist_ok=True)
    try:
        return Dashboard((host, port), root.resolve())
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def run(cfg) -> None:
    """`alignkit ui`: serve until Ctrl-C; runs started from the page keep going after it closes."""
    server = serve(Path(cfg.runs), cfg.host, cfg.port)
    warning = bind_warning(cfg.host)
    if warning:
        print(warning, file=sys.stderr)
    host, port = server.server_address[:2]
    print(f"alignkit ui: http://{host}:{port}/ (runs in {server.root}); Ctrl-C to quit", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("alignkit ui: closed; runs started from it keep going", file=sys.stderr)
    finally:
        server.server_close()
