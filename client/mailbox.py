"""Mailboxes: slot descriptors from the broker to a local client through shared memory.

A client that maps the ring gets its batch descriptors without a ZeroMQ
message per batch: the broker appends ``BatchMsg`` records to the client's
mailbox, a single-producer single-consumer queue in the ring segment's
header, and the client reads them when it wants a batch. ZeroMQ carries only
what is not per batch: credit and released slots (coalesced ACKs), errors,
pings, and a WAKE when the client sleeps.

Each mailbox is ``MAILBOX_CONTROL`` bytes of control words and then
``capacity`` records of 32 bytes::

    word 0  token    stamped by the broker when it assigns the mailbox; the
                     client checks it, so a mailbox reassigned to another
                     client is never read as its own
    word 1  tail     records written so far; the client keeps its own head
    word 8  waiting  set by the client before it sleeps on its socket: the
                     tail it wants to be woken at; cleared by the broker when
                     it sends WAKE (its own cache line); if records came
                     meanwhile the client does not sleep and the word stays
                     set, costing at most one spare WAKE

A sleeping client asks to be woken only after ``wake_after`` records (or
sooner, when the broker has nothing more in the making for it): each wake-up
of a process costs tens of microseconds of CPU on a small VM, which a starved
consumer would otherwise spend once per batch, taken from the workers. The
client's poll slice bounds the wait whatever the broker does.

The broker never has more than the client's credit outstanding, and credit
is at most half the ring's slots, so ``capacity = slots`` is never overrun.

Ordering: the broker writes records, then ``tail``; x86-64 keeps stores in
order, and the client reads ``tail`` before the records. Sleeping is a
store-then-load on each side (client: ``waiting``, then ``tail``; broker:
``tail``, then ``waiting``), which needs a full fence between them, or both
can miss and the wake is lost: ``fence()`` is an uncontended lock round
trip, whose locked instruction is a full barrier on x86-64. Other machines
use the per-batch BATCHES messages (``supported()``). A lost wake would cost
one poll timeout, never a hang.
"""

from __future__ import annotations

import platform
import threading

import numpy as np

from .layout import BATCH_RECORD, MAILBOX_CONTROL, mailbox_bytes
from .protocol import BatchMsg, ProtocolError

_TOKEN, _TAIL, _WAITING = 0, 1, 8
_FENCE = threading.Lock()


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def open_mailbox(base: np.ndarray, first_offset: int, capacity: int, k: int) -> "Mailbox":
    """Mailbox ``k`` of a segment whose mailboxes start at ``first_offset``."""
    return Mailbox(base, first_offset + k * mailbox_bytes(capacity), capacity)


def fence() -> None:
    _FENCE.acquire()
    _FENCE.release()


class MailboxLost(Exception):
    """The broker gave this client's mailbox to another client."""


class Mailbox:
    """One mailbox over ``base`` (a writable uint8 array of the segment) at ``offset``."""

    def __init__(self, base: np.ndarray, offset: int, capacity: int):
        self.capacity = capacity
        self._ctl = base[offset:offset + MAILBOX_CONTROL].view(np.uint64)
        self._buf = memoryview(base[offset + MAILBOX_CONTROL:offset + mailbox_bytes(capacity)])
        self.token = 0
        self.head = 0  # the client's: records read so far

    # -- broker side -----------------------------------------------------

    def assign(self, token: int) -> None:
        self._ctl[_TOKEN] = token  # first: the previous owner stops reading at once
        self._ctl[_TAIL] = 0
        self._ctl[_WAITING] = 0

    def publish(self, records: list[BatchMsg], more_coming: bool) -> bool:
        """Append ``records``; True if the client sleeps and wants a WAKE now: it has the records
        it asked for, or ``more_coming`` is False (nothing else is being made for it)."""
        tail = int(self._ctl[_TAIL])
        for k, r in enumerate(records):
            BATCH_RECORD.pack_into(self._buf, (tail + k) % self.capacity * BATCH_RECORD.size,
                                   r.slot, r.flags, r.epoch, r.index, r.seq)
        tail += len(records)
        self._ctl[_TAIL] = tail
        fence()
        wake_at = int(self._ctl[_WAITING])
        if wake_at and (tail >= wake_at or not more_coming):
            self._ctl[_WAITING] = 0
            return True
        return False

    # -- client side -----------------------------------------------------

    def attach(self, token: int) -> None:
        self.token, self.head = token, 0

    def take(self, slots: int) -> list[BatchMsg]:
        """The records written since the last ``take``, checked as strictly as a frame."""
        tail = int(self._ctl[_TAIL])
        self._check_token()  # after tail, so that tail was ours
        count = tail - self.head
        if not 0 <= count <= self.capacity:
            raise ProtocolError(f"mailbox: {count} new records, expected 0 to {self.capacity}")
        records = []
        for n in range(self.head, tail):
            msg = BatchMsg(*BATCH_RECORD.unpack_from(self._buf, n % self.capacity * BATCH_RECORD.size))
            if not 0 <= msg.slot < slots:
                raise ProtocolError(f"mailbox: record for slot {msg.slot}, expected 0 to {slots - 1}")
            records.append(msg)
        self._check_token()  # not reassigned while we copied
        self.head = tail
        return records

    def _check_token(self) -> None:
        if int(self._ctl[_TOKEN]) != self.token:
            raise MailboxLost("the server gave this feed's mailbox to another client")

    def sleep(self, wake_after: int = 1) -> bool:
        """Ask for a WAKE once ``wake_after`` records are there; False if records arrived
        meanwhile (don't sleep)."""
        self._ctl[_WAITING] = self.head + wake_after
        fence()
        return int(self._ctl[_TAIL]) == self.head
