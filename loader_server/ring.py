"""The ring: one shared-memory segment of ``slots`` equal slots, each holding one batch.

The first page holds ``token`` (16 random bytes), which a client compares with
the token in WELCOME to be sure it mapped this server's ring and not a namesake
on another host, and then ``proof`` (16 random bytes that never travel over a
socket), which a client sends back in MODE to show that it maps the ring: only
such a client may hold slots as descriptors. ``MAILBOXES`` client mailboxes follow (``client/mailbox.py``);
the header ends on a page boundary. Slot ``k`` starts at
``header + k * slot_bytes``; inside
it the features array ``x`` and the labels array ``y`` each start on a
64-byte boundary, so TensorFlow can alias them without a copy. The layout is
sent to clients as plain JSON; they map the same file and build the same views.

Slot states belong to the broker alone::

    FREE -> FILLING(worker) -> READY -> LEASED(client) -> FREE
"""

from __future__ import annotations

import enum
import mmap
import secrets
from dataclasses import asdict, dataclass

import numpy as np

from client.mailbox import mailbox_bytes, open_mailbox
from client.protocol import PROOF_BYTES, PROOF_OFFSET, TOKEN_BYTES

from . import shm

ALIGN = 64
PAGE = mmap.PAGESIZE
MAILBOXES = 32  # local clients beyond this get their descriptors in BATCHES messages


class SlotState(enum.Enum):
    FREE = "free"
    FILLING = "filling"
    READY = "ready"
    LEASED = "leased"


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An empty array aligned as a slot's arrays are (numpy's own may start on 16 bytes), so
    a batch made into it runs the kernels a slot gets: warm-ups compile those."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


@dataclass(frozen=True)
class Layout:
    segment: str
    token: str  # hex of the bytes at the start of the segment
    header: int
    slots: int
    slot_bytes: int
    x_offset: int
    x_shape: tuple
    x_dtype: str
    y_offset: int
    y_shape: tuple
    y_dtype: str
    mailboxes: int
    mailbox_offset: int
    mailbox_capacity: int

    @classmethod
    def plan(cls, segment: str, slots: int, x_shape: tuple, x_dtype, y_shape: tuple, y_dtype) -> "Layout":
        x_dtype, y_dtype = np.dtype(x_dtype), np.dtype(y_dtype)
        x_bytes = int(np.prod(x_shape)) * x_dtype.itemsize
        y_offset = _round_up(x_bytes, ALIGN)
        y_bytes = int(np.prod(y_shape)) * y_dtype.itemsize
        slot_bytes = _round_up(y_offset + y_bytes, PAGE)
        header = _round_up(PAGE + MAILBOXES * mailbox_bytes(slots), PAGE)
        return cls(segment, secrets.token_hex(TOKEN_BYTES), header, slots, slot_bytes, 0, tuple(x_shape), x_dtype.str,
                   y_offset, tuple(y_shape), y_dtype.str, MAILBOXES, PAGE, slots)

    @property
    def nbytes(self) -> int:
        return self.header + self.slots * self.slot_bytes

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Ring:
    """The server's mapping of the ring segment and per-slot array views."""

    def __init__(self, layout: Layout, create: bool, file_id: shm.FileId | None = None):
        """``create``: the server makes the segment and records ``self.file_id``; otherwise (a
        worker) it maps the segment only if it is still the file ``file_id`` names."""
        self.layout = layout
        if create:
            shm.check_space(layout.nbytes, f"a ring of {layout.slots} slots x {layout.slot_bytes} bytes")
            self._mm, self.file_id = shm.create(layout.segment, layout.nbytes)
            self._mm[:TOKEN_BYTES] = bytes.fromhex(layout.token)
            self.proof = secrets.token_bytes(PROOF_BYTES)
            self._mm[PROOF_OFFSET:PROOF_OFFSET + PROOF_BYTES] = self.proof
        else:
            self._mm, self.file_id = shm.attach(layout.segment, file_id), file_id
        self.x = [self._view(k, layout.x_offset, layout.x_shape, layout.x_dtype) for k in range(layout.slots)]
        self.y = [self._view(k, layout.y_offset, layout.y_shape, layout.y_dtype) for k in range(layout.slots)]
        base = np.frombuffer(self._mm, np.uint8)
        self.mailboxes = [open_mailbox(base, layout.mailbox_offset, layout.mailbox_capacity, k)
                          for k in range(layout.mailboxes)] if create else []

    def _view(self, slot: int, offset: int, shape: tuple, dtype: str) -> np.ndarray:
        start = self.layout.header + slot * self.layout.slot_bytes
        return np.ndarray(shape, np.dtype(dtype), buffer=self._mm, offset=start + offset)

    def close(self) -> None:
        """Drop the views, then unmap. Views still referenced elsewhere (batches ZeroMQ had not yet
        sent when its sockets closed) keep the mapping alive until they are collected."""
        self.x, self.y, self.mailboxes = [], [], []
        try:
            self._mm.close()
        except BufferError:
            pass  # unmapped when the last view goes; the name is already unlinked
