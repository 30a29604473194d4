"""Where a ringfeed service lives on this host: runtime folder, endpoint, state.

Shared by the server (which creates these) and the client (which finds them),
so the rules are written once. The runtime folder is owner-only (0700).

Trust: a runtime folder or state file is used only if it is what it claims to
be (a real folder or regular file, never a symlink), owned by this user and
not writable by group or others. Anyone can pre-create ``/tmp/ringfeed-<uid>``
when ``XDG_RUNTIME_DIR`` is unset, so an existing folder is checked, never
chmod-ed into shape.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "ringfeed"
# ringfeed-<pid namespace inode>-<owner pid>-<token>-<kind>: the namespace tells apart servers
# whose pids are compared, so a cleanup in another pid namespace never judges our segments.
SEGMENT_NAME = re.compile(rf"^{SHM_PREFIX}-(\d{{1,20}})-(\d{{1,10}})-([0-9a-z]{{1,32}})-(ring|data)$")
SERVICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STATE_BYTES = 64 * 1024
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


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


def _untrusted(st: os.stat_result, is_kind, kind: str) -> str | None:
    """What makes the file described by ``st`` untrustworthy as a ``kind``, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not is_kind(st.st_mode):
        return f"is not a {kind}"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & _SHARED_WRITE:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_runtime_dir(path: Path) -> Path:
    """``path`` if it is a folder this user owns that nobody else can write to; else
    ``PermissionError`` (``FileNotFoundError`` if it does not exist). Never changes it."""
    problem = _untrusted(os.lstat(path), stat.S_ISDIR, "folder")
    if problem:
        raise PermissionError(f"runtime folder {path} {problem}, so ringfeed will not trust it; "
                              "set RINGFEED_RUNTIME_DIR to a folder of your own")
    return path


def ensure_runtime_dir() -> Path:
    """The runtime folder, created owner-only if missing, else checked (``check_runtime_dir``)."""
    path = runtime_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # then it is checked like the one we make
        path.mkdir(mode=0o700)
    return check_runtime_dir(path)


def trusted_runtime_dir() -> Path:
    """The runtime folder for a client about to use it; ``PermissionError`` if it is untrusted,
    ``FileNotFoundError`` if no service has made it."""
    return check_runtime_dir(runtime_dir())


def read_state_file(path: Path) -> dict | None:
    """The JSON object in state file ``path``, or None if there is none. ``PermissionError`` if
    the file or its folder is not trusted (see the module docstring), ``ValueError`` if it is
    over ``MAX_STATE_BYTES`` or not a JSON object."""
    try:
        check_runtime_dir(path.parent)
        # O_NONBLOCK: a FIFO planted under the name must not hang the reader
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"state file {path} is a symbolic link, so ringfeed will not trust it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        problem = _untrusted(st, stat.S_ISREG, "regular file")
        if problem:
            raise PermissionError(f"state file {path} {problem}, so ringfeed will not trust it")
        data = f.read(MAX_STATE_BYTES + 1)  # bounded even if the file grows after fstat
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"state file {path} is more than {MAX_STATE_BYTES} bytes")
    state = json.loads(data)
    if not isinstance(state, dict):
        raise ValueError(f"state file {path} holds a JSON {type(state).__name__}, expected an object")
    return state


def default_endpoint(name: str = "default") -> str:
    return f"ipc://{runtime_dir() / (name + '.sock')}"


def check_endpoint(endpoint) -> str:
    """``endpoint`` if it is ``ipc://PATH`` or ``tcp://HOST:PORT``; else ``ValueError`` naming it."""
    scheme, sep, rest = endpoint.partition("://") if isinstance(endpoint, str) else ("", "", "")
    if not sep or scheme not in ("ipc", "tcp") or not rest:
        raise ValueError(f"endpoint must be ipc://PATH or tcp://HOST:PORT, got {endpoint!r}")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint must be tcp://HOST:PORT with a port from 1 to 65535, got {endpoint!r}")
    return endpoint


def service_endpoint(name: str = "default") -> str:
    """Where the local service ``name`` listens: the endpoint its state file names (a TCP one
    too), else the default ipc endpoint. ``PermissionError`` if the state file is not trusted."""
    try:
        state = read_state_file(state_file(name))
    except ValueError:  # too large or not a JSON object: not a file a server wrote
        state = None
    try:
        return check_endpoint(state.get("endpoint") if state else None)
    except ValueError:
        return default_endpoint(name)


def ipc_socket_path(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint; None for other transports."""
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def state_file(name: str = "default") -> Path:
    return runtime_dir() / f"{name}.json"


def config_file(name: str = "default") -> Path:
    """The resolved config ``ringfeed start`` wrote for service ``name`` (its server reads it)."""
    return runtime_dir() / f"{name}.config.json"


def log_file(name: str = "default") -> Path:
    return runtime_dir() / f"{name}.log"


def service_names() -> list[str]:
    """The names of the services with a state file in the runtime folder (live or not), sorted."""
    try:
        folder = check_runtime_dir(runtime_dir())
    except FileNotFoundError:
        return []
    return sorted(path.stem for path in folder.glob("*.json") if SERVICE_NAME.match(path.stem))


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
