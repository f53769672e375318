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

Every request is refused (403) unless its Host header names this server: the address it is bound to or a
loopback name (localhost, 127.0.0.1, [::1]) with its port. A web page on another site whose name is re-pointed
at 127.0.0.1 (DNS rebinding) sends its own name as Host, so it gets nothing. A request that carries an Origin
must come from the Host it names. Every /api route also needs the server's secret in the X-Alignkit-Token
header (401 without it): a fresh one is made at each start and printed in the start-up URL as ?token=..., and
the page keeps it in sessionStorage. The page itself holds no run data and is served without it. `--no-auth`
drops the secret, and is refused unless the server binds a loopback address. POSTs must be `application/json`
(a cross-site form cannot send that without the browser asking first) and at most MAX_BODY bytes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import mimetypes
import secrets
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
TOKEN_HEADER = "X-Alignkit-Token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")
GET_ROUTES = {"/": "page", "/index.html": "page", "/api/runs": "list_runs", "/api/metrics": "metrics",
              "/api/run": "run_detail", "/api/file": "file", "/api/fields": "fields"}
POST_ROUTES = {"/api/validate": "validate", "/api/launch": "launch", "/api/stop": "stop", "/api/resume": "resume"}


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers this server answers; None (any) for a wildcard bind, which always has a token.

    Machines reach a wildcard bind under names this process cannot list, and there the token is what keeps
    a rebinding page out: it can send requests but cannot learn the secret."""
    if host in WILDCARDS:
        return None
    names = {*LOOPBACK_NAMES, f"[{host}]".lower() if ":" in host else host.lower()}
    with_port = {f"{name}:{port}" for name in names}
    return frozenset(with_port | (names if port == 80 else set()))


class Dashboard(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path, auth: bool = True):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.root = root
        self.launcher = Launcher(root)
        self.token = secrets.token_urlsafe(32) if auth else None
        self.hosts = allowed_hosts(address[0], self.server_address[1])

    def url(self) -> str:
        """The address to open, with the token when there is one."""
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")

    def token_matches(self, given: str | None) -> bool:
        if self.token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())


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
        self.send_header("Referrer-Policy", "no-referrer")  # the page's URL may still hold the token
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, value, status: int = 200) -> None:
        self.send(status, json.dumps(value).encode(), "application/json")

    def fail(self, status: int, message: str) -> None:
        self.send_json({"error": message}, status)

    # ------------------------------------------------------------ dispatch

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        self.dispatch(GET_ROUTES.get(url.path), url.path, lambda: {k: v[-1] for k, v in parse_qs(url.query).items()})

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        self.dispatch(POST_ROUTES.get(url.path), url.path, self.read_body)

    def dispatch(self, route: str | None, path: str, arguments) -> None:
        """Refusals first (before a 404, so a foreign page cannot even probe which paths exist), then the route."""
        refusal = self.refuse(path)
        if refusal:
            return self.fail(*refusal)
        if route is None:
            return self.fail(HTTPStatus.NOT_FOUND, f"no such endpoint {path}")
        try:
            values = arguments()
        except ValueError:
            return self.fail(HTTPStatus.BAD_REQUEST, "the request body is not JSON")
        self.answer(getattr(self, route), values)

    def refuse(self, path: str) -> tuple[int, str] | None:
        """(status, why) for a request from a foreign Host or Origin, without the token, or a bad POST body."""
        host = (self.headers.get("Host") or "").lower()
        if self.server.hosts is not None and host not in self.server.hosts:
            return HTTPStatus.FORBIDDEN, f"Host {host!r} is not this dashboard; open {self.server.url().split('?')[0]}"
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc.lower() != host:
            return HTTPStatus.FORBIDDEN, f"cross-origin request from {origin} refused"
        if path.startswith("/api/") and not self.server.token_matches(self.headers.get(TOKEN_HEADER)):
            return HTTPStatus.UNAUTHORIZED, "missing or wrong token: open the URL alignkit ui printed (?token=...)"
        if self.command == "POST" and self.headers.get_content_type() != "application/json":
            return HTTPStatus.FORBIDDEN, "POST bodies must be application/json"
        if self.command == "POST" and int(self.headers.get("Content-Length") or 0) > MAX_BODY:
            return HTTPStatus.FORBIDDEN, "request body too large"
        return None

    def read_body(self) -> dict:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        return body if isinstance(body, dict) else {}

    def answer(self, route, arguments: dict) -> None:
        """Run a route; refused paths are 403, bad input 400 with the one-line message, missing files 404."""
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

    def fields(self, _query: dict) -> None:
        self.send_json(form_fields())

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
    """The warning printed when the page is reachable from other machines."""
    if is_loopback(host):
        return None
    return (f"alignkit: warning: listening on {host}, not loopback: anyone who can reach this address and learns "
            "the token can read these runs and start or stop runs (plain HTTP: the token crosses the network "
            "unencrypted)")


def serve(root: Path, host: str, port: int, auth: bool = True) -> Dashboard:
    """The bound server (not yet serving); port 0 picks a free one (tests use that)."""
    if not 0 <= port < 65536:
        raise UserError(f"'port' must be in [0, 65535], got {port}")
    if not auth and not is_loopback(host):
        raise UserError(f"--no-auth is refused with --host {host}: without the token anyone who can reach it "
                        "could start runs; bind 127.0.0.1 or keep the token")
    root.mkdir(parents=True, exist_ok=True)
    try:
        return Dashboard((host, port), root.resolve(), auth)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def run(cfg) -> None:
    """`alignkit ui`: serve until Ctrl-C; runs started from the page keep going after it closes."""
    server = serve(Path(cfg.runs), cfg.host, cfg.port, auth=not cfg.no_auth)
    warning = bind_warning(cfg.host)
    if warning:
        print(warning, file=sys.stderr)
    print(f"alignkit ui: {server.url()} (runs in {server.root}); Ctrl-C to quit", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("alignkit ui: closed; runs started from it keep going", file=sys.stderr)
    finally:
        server.server_close()
