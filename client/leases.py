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

import mmap
import os
import weakref
from collections import deque
from pathlib import Path

import numpy as np

from .paths import SHM_DIR
from .protocol import PROOF_BYTES, PROOF_OFFSET


class RingMapping:
    """The client's mapping of the server's ring segment; ``OSError`` if it is not reachable here."""

    def __init__(self, layout: dict):
        path = Path(SHM_DIR) / layout["segment"]
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < layout["header"] + layout["slots"] * layout["slot_bytes"]:
                raise OSError(f"ring segment {path} is {size} bytes, smaller than its layout")
            self.mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        token = bytes.fromhex(layout["token"])
        if self.mmap[:len(token)] != token:
            self.mmap.close()
            raise OSError(f"{path} is another server's segment (token mismatch)")
        self.base = np.frombuffer(self.mmap, np.uint8)
        self.address, self.nbytes = self.base.ctypes.data, size
        self.layout = layout
        self.x_dtype, self.y_dtype = np.dtype(layout["x_dtype"]), np.dtype(layout["y_dtype"])
        self.x_shape, self.y_shape = tuple(layout["x_shape"]), tuple(layout["y_shape"])

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
    start = mapping.address + mapping.layout["header"] + slot * mapping.layout["slot_bytes"]
    x = np.asarray(_SlotArray(lease, start + mapping.layout["x_offset"], mapping.x_shape, mapping.x_dtype))
    y = np.asarray(_SlotArray(lease, start + mapping.layout["y_offset"], mapping.y_shape, mapping.y_dtype))
    return x, y


def copy_arrays(mapping: RingMapping, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) copied out of ``slot``, so the slot can be released at once."""
    start = mapping.layout["header"] + slot * mapping.layout["slot_bytes"]
    return (mapping.view(start + mapping.layout["x_offset"], mapping.x_shape, mapping.x_dtype).copy(),
            mapping.view(start + mapping.layout["y_offset"], mapping.y_shape, mapping.y_dtype).copy())


def frame_arrays(layout: dict, x_frame, y_frame) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the received ZeroMQ frames of a batch, without another copy."""
    arrays = []
    for frame, shape, dtype in ((x_frame, layout["x_shape"], layout["x_dtype"]),
                                (y_frame, layout["y_shape"], layout["y_dtype"])):
        dtype = np.dtype(dtype)
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(frame) != expected:
            raise ValueError(f"batch frame of {len(frame)} bytes, expected {expected} for {tuple(shape)} {dtype}")
        arrays.append(np.frombuffer(frame, dtype).reshape(shape))
    return arrays[0], arrays[1]
