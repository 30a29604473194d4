"""The ring: one shared-memory segment of ``slots`` equal slots, each holding one batch.

The first page holds ``token`` (16 random bytes), which a client compares with
the token in WELCOME to be sure it mapped this server's ring and not a namesake
on another host, and then ``proof`` (16 random bytes that never travel over a
socket), which a client sends back in MODE to show that it maps the ring: only
such a client may hold slots as descriptors. ``MAILBOXES`` client mailboxes
follow (``client/mailbox.py``); the header ends on a page boundary. Inside a
slot, every field of the batch starts on a 64-byte boundary: the layout is
``ringfeed.layout.RingLayout``, which clients receive as JSON and check before
they map the same file and build the same views.

Slot states belong to the broker's scheduler alone (``scheduler.py``)::

    FREE -> FILLING(worker) -> READY -> LEASED(client) -> FREE
"""

from __future__ import annotations

import enum
import secrets

import numpy as np

from ringfeed.layout import ALIGN, PAGE, TOKEN_BYTES, RingLayout, mailbox_bytes, round_up
from ringfeed.mailbox import open_mailbox
from ringfeed.protocol import PROOF_BYTES, PROOF_OFFSET

from . import shm

MAILBOXES = 32  # local clients beyond this get their descriptors in BATCHES messages


class SlotState(enum.Enum):
    FREE = "free"
    FILLING = "filling"
    READY = "ready"
    LEASED = "leased"


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An empty array aligned as a slot's arrays are (numpy's own may start on 16 bytes), so
    a batch made into it runs the kernels a slot gets: warm-ups compile those."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def plan_layout(segment: str, slots: int, fields: dict[str, tuple[tuple, np.dtype]]) -> RingLayout:
    """A fresh ring's layout: a new token, and ``fields`` (name -> (batch shape, dtype)) in each slot."""
    header = round_up(PAGE + MAILBOXES * mailbox_bytes(slots), PAGE)
    return RingLayout.plan(segment, secrets.token_bytes(TOKEN_BYTES), slots,
                           [(name, shape, np.dtype(dtype).str) for name, (shape, dtype) in fields.items()],
                           header, MAILBOXES, PAGE)


class Ring:
    """The server's mapping of the ring segment and per-slot array views."""

    def __init__(self, layout: RingLayout, create: bool, file_id: shm.FileId | None = None):
        """``create``: the server makes the segment and records ``self.file_id``; otherwise (a
        worker) it maps the segment only if it is still the file ``file_id`` names."""
        self.layout = layout
        if create:
            shm.check_space(layout.nbytes, f"a ring of {layout.slots} slots x {layout.slot_bytes} bytes")
            self._mm, self.file_id = shm.create(layout.segment, layout.nbytes)
            self._mm[:TOKEN_BYTES] = layout.token
            self.proof = secrets.token_bytes(PROOF_BYTES)
            self._mm[PROOF_OFFSET:PROOF_OFFSET + PROOF_BYTES] = self.proof
        else:
            self._mm, self.file_id = shm.attach(layout.segment, file_id), file_id
        # slot -> field name -> the field's array in that slot
        self.arrays = [{f.name: self._view(k, f.offset, f.shape, f.dtype) for f in layout.fields}
                       for k in range(layout.slots)]
        base = np.frombuffer(self._mm, np.uint8)
        self.mailboxes = [open_mailbox(base, layout.mailbox_offset, layout.mailbox_capacity, k)
                          for k in range(layout.mailboxes)] if create else []

    def _view(self, slot: int, offset: int, shape: tuple, dtype: str) -> np.ndarray:
        return np.ndarray(shape, np.dtype(dtype), buffer=self._mm, offset=self.layout.slot_start(slot) + offset)

    def close(self) -> None:
        """Drop the views, then unmap. Views still referenced elsewhere (batches ZeroMQ had not yet
        sent when its sockets closed) keep the mapping alive until they are collected."""
        self.arrays, self.mailboxes = [], []
        try:
            self._mm.close()
        except BufferError:
            pass  # unmapped when the last view goes; the name is already unlinked
