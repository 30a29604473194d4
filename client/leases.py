"""Zero-copy numpy views of ring slots that give the slot back when they die.

Each delivered batch becomes one ``_Lease``; the array of each of its fields
is a numpy array built through an ``__array_interface__`` object that holds the
lease, so every array, view or TensorFlow tensor aliasing any of them keeps the
lease alive. When the last of them all is gone, ``weakref.finalize`` puts the
slot on a queue, which the socket owner drains (finalizers may run on any
thread; sockets are not thread-safe). The mapping itself is only unmapped by
garbage collection after the last view: closing the feed never invalidates an
array it handed out.
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

from .layout import TOKEN_BYTES, RingLayout
from .paths import SEGMENT_NAME, SHM_DIR
from .protocol import PROOF_BYTES, PROOF_OFFSET, ProtocolError

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
        self.dtypes = tuple(np.dtype(field.dtype) for field in layout.fields)  # of layout.fields, once

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


def lease_arrays(mapping: RingMapping, slot: int, released: deque) -> dict[str, np.ndarray]:
    """Every field's array, aliasing ``slot``; ``slot`` is appended to ``released`` once all are gone."""
    lease = _Lease(mapping)
    weakref.finalize(lease, released.append, slot)
    start = mapping.address + mapping.layout.slot_start(slot)
    return {field.name: np.asarray(_SlotArray(lease, start + field.offset, field.shape, dtype))
            for field, dtype in zip(mapping.layout.fields, mapping.dtypes)}


def copy_arrays(mapping: RingMapping, slot: int) -> dict[str, np.ndarray]:
    """Every field's array, copied out of ``slot``, so the slot can be released at once."""
    start = mapping.layout.slot_start(slot)
    return {field.name: mapping.view(start + field.offset, field.shape, dtype).copy()
            for field, dtype in zip(mapping.layout.fields, mapping.dtypes)}


def frame_arrays(layout: RingLayout, frames) -> dict[str, np.ndarray]:
    """Every field's array over its received ZeroMQ frame (``frames`` in layout order), without
    another copy."""
    if len(frames) != len(layout.fields):
        raise ProtocolError(f"BATCH: {len(frames)} array frames, expected one for each of the "
                            f"{len(layout.fields)} fields {list(layout.names)}")
    arrays = {}
    for frame, field in zip(frames, layout.fields):
        dtype = np.dtype(field.dtype)
        if len(frame) != field.nbytes:
            raise ProtocolError(f"BATCH: the frame of field {field.name!r} is {len(frame)} bytes, expected "
                                f"{field.nbytes} for {field.shape} {dtype}")
        arrays[field.name] = np.frombuffer(frame, dtype).reshape(field.shape)
    return arrays
