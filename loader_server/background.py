"""``ringfeed start/stop``: the server as a detached background process.

``start`` writes the resolved ``Config`` to ``<runtime>/<name>.config.json``
(every default filled in, paths absolute) and launches ``ringfeed serve
--config`` on that file in a new session with its output in a log file, under
``python -P``: neither the server nor its workers
(multiprocessing passes ``-P`` on) import modules from the caller's current
folder, where a ``secrets.py`` would otherwise shadow the standard library.
It returns once the server has written its state file (which it does when
the workers are warm and the endpoint is bound) or fails with this start's
log lines (earlier runs' are left out), its last error line first.
``stop`` sends SIGTERM (the server's shutdown protocol does the rest),
escalates to SIGKILL after ``STOP_TIMEOUT_S`` and then removes whatever the
dead server left behind. Both are bounded and idempotent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from ringfeed.paths import (config_file, ensure_runtime_dir, log_file, read_state_file, runtime_dir, service_names,
                          state_file)

from . import shm
from .config import Config, ConfigError
from .procs import pid_alive

POLL_S = 0.2
STOP_TIMEOUT_S = 15.0
LOG_LINES = 25
MAX_LOG_READ_BYTES = 256 * 1024  # of this start's log: its last lines are what explains a failure
# What a failed start's last words look like: our own one-line error, an exception, a logged error
_ERROR_LINE = re.compile(r"^(ringfeed: |[\w.]*(Error|Exception|Exit|Failed|Interrupt)\b)| ERROR ")


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
    # A file naming this very process is an earlier life's: a container restarted gives its
    # server the same pid, and a live server never reads its own state file.
    if not pid_alive(pid) or pid == os.getpid():
        path.unlink(missing_ok=True)
        return None
    return state


def name_at(endpoint: str) -> str:
    """The name of the live service whose state file says it listens at ``endpoint``."""
    try:
        names = service_names()
    except PermissionError as exc:  # an untrusted folder: its state files name pids to signal
        raise BackgroundError(str(exc)) from None
    for name in names:
        state = read_state(name)
        if state is not None and state.get("endpoint") == endpoint:
            return name
    raise BackgroundError(f"no running ringfeed service listens at {endpoint!r} (none of the state files "
                          f"in {runtime_dir()} names it); see ringfeed status --endpoint {endpoint}")


def _start_failed(what: str, path, offset: int) -> BackgroundError:
    """``what`` went wrong: the error, with the log lines written since ``offset`` (this start's,
    not earlier runs'), the last error line first."""
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            log.seek(max(offset, size - MAX_LOG_READ_BYTES))
            lines = log.read(MAX_LOG_READ_BYTES).decode(errors="replace").splitlines()[-LOG_LINES:]
    except FileNotFoundError:
        lines = []
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    first = f": {errors[-1].removeprefix('ringfeed: error: ')}" if errors else ""
    body = "\n".join(lines) if lines else "(nothing logged)"
    return BackgroundError(f"{what}{first}\nlog {path}, this start's lines:\n{body}")


def _write_config(config: Config) -> str:
    try:
        text = json.dumps(config.to_json(), indent=1)
    except (TypeError, ValueError) as exc:  # an augment parameter given from Python as, say, an array
        raise ConfigError(f"the config cannot be handed to a background server as JSON: {exc}") from None
    path = config_file(config.name)
    path.unlink(missing_ok=True)  # a new file, owner-only, never through a planted link
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return str(path)


def start(config: Config, timeout_s: float) -> dict:
    """Start ``ringfeed serve`` on ``config`` detached; return its state once it is ready."""
    name = config.name
    running = read_state(name)
    if running:
        raise BackgroundError(f"a ringfeed server named {name!r} is already running "
                              f"(pid {running['pid']}, {running['endpoint']}); stop it first")
    ensure_runtime_dir()
    config_path = _write_config(config)
    log_path = log_file(name)
    with open(log_path, "ab") as log:
        offset = os.fstat(log.fileno()).st_size
        proc = subprocess.Popen([sys.executable, "-P", "-m", "ringfeed.server.cli", "serve", "--config", config_path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise _start_failed(f"ringfeed server exited with code {code} during start-up", log_path, offset)
        state = read_state(name)
        if state and state["pid"] == proc.pid:  # written once the workers are warm and the endpoint bound
            return {**state, "log": str(log_path)}
        time.sleep(POLL_S)
    proc.kill()
    proc.wait(STOP_TIMEOUT_S)
    raise _start_failed(f"ringfeed server was not ready within {timeout_s} s", log_path, offset)


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
