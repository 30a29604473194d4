"""Named shared-memory segments under /dev/shm, owned by the server.

Segments are plain files in ``SHM_DIR`` (``/dev/shm``) opened with ``os.open``
and mapped with ``mmap``, not ``multiprocessing.shared_memory``: Python 3.11
registers every attached ``SharedMemory`` with the resource tracker, which
unlinks it when the *attaching* process exits. Here only the owner unlinks.

``create`` allocates every byte (``posix_fallocate``), so a segment that does
not fit fails at start-up with a ``ConfigError`` instead of a worker dying of
SIGBUS on first touch; it returns the file's ``FileId`` (device, inode).
``attach`` (workers) opens without following links and refuses a file that is
not a regular file of ours with the recorded ``FileId``: a namesake put in its
place is never mapped.

Names are ``ringfeed-<pid namespace inode>-<owner pid>-<token>-<kind>``
(``ringfeed.paths.SEGMENT_NAME``). ``remove_stale`` unlinks a segment only when
all of these hold: its name follows that pattern, its namespace is ours (pids
compare only within one namespace), it is a regular file (not a link) owned by
our uid, and its owner pid is not alive.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from typing import NamedTuple

from ringfeed.paths import SEGMENT_NAME, SHM_DIR, SHM_PREFIX, pid_namespace_id

from .config import ConfigError
from .procs import pid_alive


class FileId(NamedTuple):
    """Which file a path named when the server created it."""

    dev: int
    ino: int


class SegmentError(RuntimeError):
    """A segment is not the one the server created."""


def segment_name(owner_pid: int, token: str, kind: str) -> str:
    name = f"{SHM_PREFIX}-{pid_namespace_id()}-{owner_pid}-{token}-{kind}"
    if not SEGMENT_NAME.match(name):
        raise ValueError(f"segment name {name!r} does not follow {SEGMENT_NAME.pattern}")
    return name


def create(name: str, nbytes: int) -> tuple[mmap.mmap, FileId]:
    """A new segment of ``nbytes``, every page allocated; the mapping and the file's identity."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        _allocate(fd, name, nbytes)
        st = os.fstat(fd)
        return mmap.mmap(fd, nbytes), FileId(st.st_dev, st.st_ino)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _allocate(fd: int, name: str, nbytes: int) -> None:
    # ftruncate alone makes a sparse file: it "fits" whatever /dev/shm holds, and the first
    # page that does not fit kills the worker that touches it with SIGBUS.
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ConfigError(f"segment {SHM_DIR / name} needs {nbytes} bytes of shared memory but "
                          f"{SHM_DIR} has {free_bytes()} bytes free; use fewer --slots or a smaller "
                          "--batch-size, or give the container more (docker: --shm-size / compose: "
                          "shm_size)") from None


def attach(name: str, expected: FileId, writable: bool = True) -> mmap.mmap:
    """Map segment ``name``, which must still be the file the server created (``expected``)."""
    path = SHM_DIR / name
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        _check_identity(path, st, expected)
        return mmap.mmap(fd, st.st_size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _check_identity(path, st: os.stat_result, expected: FileId) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_uid != os.getuid():
        raise SegmentError(f"{path} is owned by uid {st.st_uid}, expected our uid {os.getuid()}")
    found = FileId(st.st_dev, st.st_ino)
    if found != expected:
        raise SegmentError(f"{path} is not the segment the server created: it is {found}, "
                           f"expected {expected}")


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
    """Unlink every segment of ours (see the module docstring) whose owner process is gone."""
    removed = []
    for entry in os.listdir(SHM_DIR):
        if _is_stale(entry):
            unlink(entry)
            removed.append(entry)
    return removed


def _is_stale(entry: str) -> bool:
    match = SEGMENT_NAME.match(entry)
    if not match or int(match.group(1)) != pid_namespace_id():
        return False
    try:
        st = os.lstat(SHM_DIR / entry)
    except FileNotFoundError:  # its owner unlinked it meanwhile
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not pid_alive(int(match.group(2)))
