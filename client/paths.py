"""Where a ringfeed service lives on this host: runtime folder, endpoint, state.

Shared by the server (which creates these) and the client (which finds them),
so the rules are written once. The runtime folder is owner-only (0700).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "ringfeed"
# ringfeed-<pid namespace inode>-<owner pid>-<token>-<kind>: the namespace tells apart servers
# whose pids are compared, so a cleanup in another pid namespace never judges our segments.
SEGMENT_NAME = re.compile(rf"^{SHM_PREFIX}-(\d{{1,20}})-(\d{{1,10}})-([0-9a-z]{{1,32}})-(ring|data)$")
SERVICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(name) -> str:
    """A service name: letters, digits, '-' or '_' (it becomes file names in the runtime folder)."""
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise ValueError(f"name must be 1 to 64 letters, digits, '-' or '_', got {name!r}")
    return name


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


def pid_namespace_id() -> int:
    """The inode of this process's pid namespace (0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_namespace() -> str:
    """Identifies this process's pid namespace: pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
