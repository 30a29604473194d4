"""``ringfeed start/stop``: the server as a detached background process.

``start`` launches ``ringfeed serve`` in a new session with its output in a
log file, under ``python -P``: neither the server nor its workers
(multiprocessing passes ``-P`` on) import modules from the caller's current
folder, where a ``secrets.py`` would otherwise shadow the standard library.
It returns once the server has written its state file (which it does when
the workers are warm and the endpoint is bound) or fails with the log's tail.
``stop`` sends SIGTERM (the server's shutdown protocol does the rest),
escalates to SIGKILL after ``STOP_TIMEOUT_S`` and then removes whatever the
dead server left behind. Both are bounded and idempotent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from client.paths import ensure_runtime_dir, log_file, read_state_file, state_file

from . import shm
from .procs import pid_alive

POLL_S = 0.2
STOP_TIMEOUT_S = 15.0


class BackgroundError(RuntimeError):
    pass


def read_state(name: str) -> dict | None:
    """The state file of a live server called ``name``, else ``None`` (a stale file is removed).
    ``BackgroundError`` if the file or its folder is not trusted (``paths.read_state_file``):
    ``stop`` would signal whatever pid it names."""
    path = state_file(name)
    try:
        state = read_state_file(path)
        if state is None:
            return None
        pid = int(state["pid"])
    except PermissionError as exc:
        raise BackgroundError(str(exc)) from None
    except (ValueError, KeyError, TypeError):
        return None
    if not pid_alive(pid):
        path.unlink(missing_ok=True)
        return None
    return state


def _tail(path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(serve_args: list[str], name: str, timeout_s: float) -> dict:
    """Start ``ringfeed serve *serve_args`` detached; return its state once it is ready."""
    running = read_state(name)
    if running:
        raise BackgroundError(f"a ringfeed server named {name!r} is already running "
                              f"(pid {running['pid']}, {running['endpoint']}); stop it first")
    ensure_runtime_dir()
    log_path = log_file(name)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "loader_server.cli", "serve", *serve_args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise BackgroundError(f"ringfeed server exited with code {code} during start-up; "
                                  f"log {log_path}:\n{_tail(log_path)}")
        state = read_state(name)
        if state and state["pid"] == proc.pid:  # written once the workers are warm and the endpoint bound
            return {**state, "log": str(log_path)}
        time.sleep(POLL_S)
    proc.kill()
    proc.wait(STOP_TIMEOUT_S)
    raise BackgroundError(f"ringfeed server was not ready within {timeout_s} s; log {log_path}:\n"
                          f"{_tail(log_path)}")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(POLL_S / 4)
    return False


def stop(name: str) -> int | None:
    """Stop the server called ``name``; return its pid, or ``None`` if none was running."""
    state = read_state(name)
    if state is None:
        shm.remove_stale()
        return None
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, STOP_TIMEOUT_S):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, STOP_TIMEOUT_S)
    state_file(name).unlink(missing_ok=True)
    shm.remove_stale()
    return pid
