"""Run a model-written Python program against its unit tests: a child process with a time limit, no network,
limited memory and files, in an empty temporary folder.

This is a guard against accidents (an endless loop, a runaway allocation, a stray download), not a security
boundary: code that sets out to escape a Python process can. Run untrusted models' code in a container.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs before the program: sockets refuse to connect, bind or send, so a test that reaches for the network fails.
NO_NETWORK = """\
import socket as _socket
def _refuse(*args, **kwargs):
    raise OSError("network access is disabled while tests run")
for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(_socket.socket, _name, _refuse)
_socket.create_connection = _socket.getaddrinfo = _refuse
del _socket, _refuse, _name
"""

MEMORY_LIMIT = 1 << 30  # bytes of address space
FILE_LIMIT = 1 << 24  # bytes a file may grow to


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "timeout", or the last line of the error


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def run_tests(program: str, tests: str, timeout_s: float = 5.0) -> Outcome:
    """Whether `program` followed by `tests` (assert statements) runs to the end within `timeout_s` seconds.

    "To the end" is proven by a random token the script writes after the last test: a program that exits early
    (`sys.exit(0)` at module level, a `__main__` block) never reaches it, even with exit code 0."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="alignkit-code-") as folder:
        script, done, errors = (os.path.join(folder, name) for name in ("candidate.py", "done", "stderr"))
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(f"{NO_NETWORK}\n{program}\n\n{tests}\n\nopen({done!r}, 'w').write({token!r})\n")
        with open(errors, "wb") as stderr:
            # -I: isolated (no user site, no PYTHON* variables); a single thread keeps BLAS within the memory cap
            child = subprocess.Popen([sys.executable, "-I", script], cwd=folder, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_limit_child,
                                     env={"PATH": os.defpath, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
                                     start_new_session=True)
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return Outcome(False, "timeout")
            finally:  # the whole group, on a timeout, an interrupt or success: nothing it started lives on
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        finished = os.path.isfile(done) and Path(done).read_text(encoding="utf-8") == token
        with open(errors, "rb") as handle:
            handle.seek(max(0, os.path.getsize(errors) - 4096))
            lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    if child.returncode == 0 and finished:
        return Outcome(True, "passed")
    if child.returncode == 0:
        return Outcome(False, "exited before the tests finished")
    return Outcome(False, lines[-1] if lines else f"exit code {child.returncode}")
