"""Where a ringfeed service lives on this host: runtime folder, endpoint, state.

Shared by the server (which creates these) and the client (which finds them),
so the rules are written once. The runtime folder is owner-only (0700).
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "ringfeed"


def runtime_dir() -> Path:
    """``$RINGFEED_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/ringfeed``, else ``/tmp/ringfeed-<uid>``."""
    explicit = os.environ.get("RINGFEED_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "ringfeed"
    return Path(f"/tmp/ringfeed-{os.getuid()}")


def ensure_runtime_dir() -> Path:
    path = runtime_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(f"runtime folder {path} is owned by another user; "
                              "set RINGFEED_RUNTIME_DIR to a folder of your own")
    path.chmod(0o700)
    return path


def default_endpoint(name: str = "default") -> str:
    return f"ipc://{runtime_dir() / (name + '.sock')}"


def state_file(name: str = "default") -> Path:
    return runtime_dir() / f"{name}.json"


def log_file(name: str = "default") -> Path:
    return runtime_dir() / f"{name}.log"


def pid_namespace() -> str:
    """Identifies this process's pid namespace: pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
