"""Named shared-memory segments under /dev/shm, owned by the server.

Segments are plain files in /dev/shm opened with ``os.open`` and mapped with
``mmap``, not ``multiprocessing.shared_memory``: Python 3.11 registers every
attached ``SharedMemory`` with the resource tracker, which unlinks it when the
*attaching* process exits. Here only the owner unlinks.

Names are ``ringfeed-<owner pid>-<token>-<kind>``, so a segment whose owner is
gone is recognisably stale and ``remove_stale`` can delete it.
"""

from __future__ import annotations

import mmap
import os

from client.paths import SEGMENT_NAME, SHM_DIR, SHM_PREFIX, pid_namespace_id

from .config import ConfigError
from .procs import pid_alive



def segment_name(owner_pid: int, token: str, kind: str) -> str:
    name = f"{SHM_PREFIX}-{pid_namespace_id()}-{owner_pid}-{token}-{kind}"
    if not SEGMENT_NAME.match(name):
        raise ValueError(f"segment name {name!r} does not follow {SEGMENT_NAME.pattern}")
    return name


def create(name: str, nbytes: int) -> mmap.mmap:
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def attach(name: str, writable: bool = True) -> mmap.mmap:
    fd = os.open(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_space(nbytes: int, what: str) -> None:
    free = free_bytes()
    if nbytes > free:
        raise ConfigError(
            f"{what} needs {nbytes / 2**20:.1f} MiB of shared memory but {SHM_DIR} has only "
            f"{free / 2**20:.1f} MiB free; use fewer --slots or a smaller --batch-size, "
            "or give the container more (docker: --shm-size / compose: shm_size)")


def remove_stale() -> list[str]:
    """Unlink every ringfeed segment whose owner process no longer exists."""
    removed = []
    for entry in os.listdir(SHM_DIR):
        match = SEGMENT_NAME.match(entry)
        if match and not pid_alive(int(match.group(2))):
            unlink(entry)
            removed.append(entry)
    return removed
