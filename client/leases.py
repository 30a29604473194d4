"""Zero-copy numpy views of ring slots that give the slot back when they die.

Each delivered batch becomes a ``_Lease``; ``x`` and ``y`` are numpy arrays
built through ``__array_interface__`` objects that hold the lease, so every
array, view or TensorFlow tensor aliasing them keeps the lease alive. When the
last one is gone, ``weakref.finalize`` puts the slot on a queue, which the
socket owner drains (finalizers may run on any thread; sockets are not
thread-safe). The mapping itself is only unmapped by garbage collection after
the last view: closing the feed never invalidates an array it handed out.
"""

from __future__ import annotations

import errno
import hmac
import mmap
import os
import stat
import weakref
from collections import deque

import numpy as np

from .paths import SEGMENT_NAME, SHM_DIR
from .protocol import PROOF_BYTES, PROOF_OFFSET, TOKEN_BYTES, RingLayout

# O_NOFOLLOW: a symlink planted under a ring's name is refused, never followed to its target;
# O_NONBLOCK: a FIFO planted there does not hang the open.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _map_segment(layout: RingLayout) -> mmap.mmap:
    """The whole of ``layout.segment``, mapped read-write once it passes ``RingMapping``'s checks."""
    if not SEGMENT_NAME.fullmatch(layout.segment):  # no '/' or '..': the file is in SHM_DIR
        raise OSError(f"{layout.segment!r} is not a ringfeed segment name")
    path = SHM_DIR / layout.segment
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"ring segment {path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"ring segment {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise OSError(f"ring segment {path} is owned by uid {st.st_uid}, not by this user "
                          f"(uid {os.getuid()})")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(f"ring segment {path} is writable by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o})")
        if st.st_size < layout.nbytes:
            raise OSError(f"ring segment {path} is {st.st_size} bytes, smaller than its layout's {layout.nbytes}")
        return mmap.mmap(fd, st.st_size)
    finally:
        os.close(fd)


class RingMapping:
    """The client's mapping of the server's ring segment; ``OSError`` if it is not reachable here
    or not to be trusted: it must be a regular file in /dev/shm (no symlink) that this user owns,
    that nobody else can write to, as large as the layout and starting with the layout's token.
    Nothing is written to it (mailboxes) until all of that holds."""

    def __init__(self, layout: RingLayout):
        self.mmap = _map_segment(layout)
        if not hmac.compare_digest(self.mmap[:TOKEN_BYTES], layout.token):
            self.mmap.close()
            raise OSError(f"ring segment {layout.segment} does not start with WELCOME's token "
                          "(another server's segment)")
        self.base = np.frombuffer(self.mmap, np.uint8)
        self.address, self.nbytes = self.base.ctypes.data, self.base.nbytes
        self.layout = layout
        self.x_dtype, self.y_dtype = np.dtype(layout.x_dtype), np.dtype(layout.y_dtype)
        self.x_shape, self.y_shape = layout.x_shape, layout.y_shape

    def proof(self) -> bytes:
        """What MODE sends to show the server that this client maps its ring."""
        return self.mmap[PROOF_OFFSET:PROOF_OFFSET + PROOF_BYTES]

    def view(self, offset: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self.base[offset:offset + nbytes].view(dtype).reshape(shape)


class _Lease:
    __slots__ = ("mapping", "__weakref__")

    def __init__(self, mapping: RingMapping):
        self.mapping = mapping


class _SlotArray:
    """An ``__array_interface__`` over slot memory that keeps its lease alive."""

    __slots__ = ("lease", "__array_interface__")

    def __init__(self, lease: _Lease, address: int, shape: tuple, dtype: np.dtype):
        self.lease = lease
        self.__array_interface__ = {"data": (address, False), "shape": shape, "typestr": dtype.str,
                                    "version": 3}


def lease_arrays(mapping: RingMapping, slot: int, released: deque) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) aliasing ``slot``; ``slot`` is appended to ``released`` once both are gone."""
    lease = _Lease(mapping)
    weakref.finalize(lease, released.append, slot)
    layout = mapping.layout
    start = mapping.address + layout.header + slot * layout.slot_bytes
    x = np.asarray(_SlotArray(lease, start + layout.x_offset, mapping.x_shape, mapping.x_dtype))
    y = np.asarray(_SlotArray(lease, start + layout.y_offset, mapping.y_shape, mapping.y_dtype))
    return x, y


def copy_arrays(mapping: RingMapping, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) copied out of ``slot``, so the slot can be released at once."""
    layout = mapping.layout
    start = layout.header + slot * layout.slot_bytes
    return (mapping.view(start + layout.x_offset, mapping.x_shape, mapping.x_dtype).copy(),
            mapping.view(start + layout.y_offset, mapping.y_shape, mapping.y_dtype).copy())


def frame_arrays(layout: RingLayout, x_frame, y_frame) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the received ZeroMQ frames of a batch, without another copy."""
    arrays = []
    for frame, shape, dtype in ((x_frame, layout.x_shape, layout.x_dtype),
                                (y_frame, layout.y_shape, layout.y_dtype)):
        dtype = np.dtype(dtype)
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(frame) != expected:
            raise ValueError(f"batch frame of {len(frame)} bytes, expected {expected} for {tuple(shape)} {dtype}")
        arrays.append(np.frombuffer(frame, dtype).reshape(shape))
    return arrays[0], arrays[1]
