"""Run a model-written Python program against its unit tests: a child process with a time limit, no network,
limited memory and files, in an empty temporary folder.

This is a guard against accidents (an endless loop, a runaway allocation, a stray download), not a security
boundary: code that sets out to escape a Python process can. Run untrusted models' code in a container.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

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
    """Whether `program` followed by `tests` (assert statements) runs to the end within `timeout_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="alignkit-code-") as folder:
        path = os.path.join(folder, "candidate.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(NO_NETWORK + "\n" + program + "\n\n" + tests + "\n")
        # -I: isolated (no user site, no PYTHON* variables, script folder not on the path of imports)
        child = subprocess.Popen([sys.executable, "-I", path], cwd=folder, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": os.defpath},
                                 preexec_fn=_limit_child, start_new_session=True)
        try:
            _, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the whole group: a program may have started its own children
            child.communicate()
            return Outcome(False, "timeout")
    if child.returncode == 0:
        return Outcome(True, "passed")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return Outcome(False, lines[-1] if lines else f"exit code {child.returncode}")
