"""How batches reach a feed: one source for each MODE, each with ``take()``.

``FrameArrivals`` ("frames", any host): each batch's bytes come in a BATCH
message, one frame per field. ``DescriptorArrivals`` ("shm", the server's host):
BATCHES messages name the ring slots that hold ready batches.
``MailboxArrivals`` ("mailbox", the local default): the server writes those
descriptors into the feed's shared-memory mailbox (``client/mailbox.py``), and
the socket carries only a WAKE when the feed sleeps.

Whichever the source, ``take(arrivals)`` appends ``Arrival``s in stream order: a batch,
or a batch that failed, with the worker's error. A failed batch comes as the
ERROR message of its batch, in its place among the batches, except in mailbox
mode: there its place is a record flagged ``FLAG_ERROR``, and its ERROR, sent
before the record, comes by the socket, so it may come after the record. The
mailbox source holds the records from a flagged one on until its ERROR is
there (or the connection is gone, or ``timeout_s`` has passed: then the error
names the batch without the details).

What breaks the stream (a slot outside the ring, a mailbox given to another
client) becomes the connection's ``failure``; a malformed message raises
``ProtocolError`` from ``take()``, after the arrivals before it were appended; the
messages after it stay on the socket.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from . import mailbox, protocol
from .connection import Connection, Message
from .errors import RemoteWorkerError, RingfeedError
from .leases import RingMapping


class Arrival(NamedTuple):
    """A batch of the stream that reached the feed, or one that failed.

    A batch (``batch``: its (epoch, index)) is in ring slot ``slot`` (``copy``: the server
    asks for it to be copied out, and the slot released, at once) or in ``frames``, one per
    field as received. A failed batch has ``failure``, the worker's error, and neither.
    A named tuple: one is made per batch, and a frozen dataclass costs several times more."""

    batch: tuple[int, int] | None = None
    slot: int | None = None
    copy: bool = False
    frames: list | None = None
    failure: RemoteWorkerError | None = None

    @classmethod
    def in_slot(cls, record: protocol.BatchMsg) -> Arrival:
        return cls((record.epoch, record.index), record.slot, bool(record.flags & protocol.FLAG_COPY))

    @classmethod
    def in_frames(cls, record: protocol.BatchMsg, frames: list) -> Arrival:
        return cls((record.epoch, record.index), frames=frames)

    @classmethod
    def failed(cls, failure: RemoteWorkerError) -> Arrival:
        return cls(failure=failure)


class FrameArrivals:
    """"frames" mode: a BATCH message for each batch, its record and then a frame per field."""

    mode = "frames"

    def __init__(self, connection: Connection, fields: int):
        self._connection, self._fields = connection, fields

    def take(self, arrivals: list[Arrival]) -> None:
        for message in self._connection.receive():
            if message.error is not None:
                arrivals.append(Arrival.failed(RemoteWorkerError(message.error)))
            elif message.command == protocol.BATCHES:
                raise protocol.ProtocolError("BATCHES (slot descriptors) sent to a feed in frames mode")
            else:
                record = protocol.parse_batch(message.frames, self._fields)
                arrivals.append(Arrival.in_frames(record, message.frames[2:]))

    def may_sleep(self) -> bool:
        """Whether the feed may now wait on its socket: here, always."""
        return True


class DescriptorArrivals:
    """"shm" mode: BATCHES messages of records naming ready slots of the mapped ring."""

    mode = "shm"

    def __init__(self, connection: Connection, slots: int):
        self._connection, self._slots = connection, slots

    def take(self, arrivals: list[Arrival]) -> None:
        for message in self._connection.receive():
            self._message(message, arrivals)

    def may_sleep(self) -> bool:
        """Whether the feed may now wait on its socket: here, always."""
        return True

    def _message(self, message: Message, arrivals: list[Arrival]) -> None:
        if message.error is not None:
            arrivals.append(Arrival.failed(RemoteWorkerError(message.error)))
        elif message.command == protocol.BATCH:
            raise protocol.ProtocolError("BATCH (bytes) sent to a feed in shm mode")
        else:
            for record in protocol.parse_batches(message.frames):
                if not record.slot < self._slots:  # its arrays would lie outside the mapping
                    self._connection.failure = RingfeedError(
                        f"the server at {self._connection.endpoint}: BATCHES: record for slot {record.slot}, "
                        f"expected 0 to {self._slots - 1}")
                    return
                arrivals.append(Arrival.in_slot(record))


class MailboxArrivals(DescriptorArrivals):
    """"mailbox" mode: records in the feed's mailbox; the ERROR of a failed batch on the socket.
    A sleeping feed asks for a WAKE once ``wake_after`` records are there."""

    mode = "mailbox"

    def __init__(self, connection: Connection, slots: int, box: mailbox.Mailbox, wake_after: int):
        super().__init__(connection, slots)
        self._mailbox: mailbox.Mailbox | None = box  # None once the server took it back
        self._wake_after = wake_after
        self._held: deque[tuple[protocol.BatchMsg, float]] = deque()  # from a failed batch on, and when read
        self._details: deque[RemoteWorkerError] = deque()  # failed batches' errors, in stream order

    def take(self, arrivals: list[Arrival]) -> None:
        self._read(arrivals)
        self._release(arrivals)
        for message in self._connection.receive():
            if message.error is not None and self._mailbox is not None:
                self._details.append(RemoteWorkerError(message.error))
            else:
                self._message(message, arrivals)
        if self._connection.expired:  # the slots it was told of are no longer this feed's
            self._mailbox = None
            self._held.clear()
        self._release(arrivals)

    def may_sleep(self) -> bool:
        """Ask for a WAKE; False if records came meanwhile (take them instead)."""
        return self._mailbox is None or self._mailbox.sleep(self._wake_after)

    def _read(self, arrivals: list[Arrival]) -> None:
        """Take the mailbox's records: into ``arrivals`` while none is held back, else held."""
        if self._mailbox is None:
            return
        try:
            records = self._mailbox.take(self._slots)
        except (mailbox.MailboxLost, protocol.ProtocolError) as exc:
            self._connection.failure = RingfeedError(f"the server at {self._connection.endpoint}: {exc}")
            self._mailbox = None
            return
        if not records:
            return
        self._connection.heard()
        now = time.monotonic()
        for record in records:
            if self._held or record.flags & protocol.FLAG_ERROR:  # from a failed batch on, all wait
                self._held.append((record, now))
            else:
                arrivals.append(Arrival.in_slot(record))

    def _release(self, arrivals: list[Arrival]) -> None:
        """Into ``arrivals``, the held records up to the first failed batch whose error has not come."""
        connection = self._connection
        while self._held:
            record, read_at = self._held[0]
            if not record.flags & protocol.FLAG_ERROR:
                arrival = Arrival.in_slot(record)
            elif self._details:
                arrival = Arrival.failed(self._details.popleft())
            elif connection.disconnected_at is not None or time.monotonic() - read_at > connection.timeout_s:
                arrival = Arrival.failed(RemoteWorkerError({
                    "kind": "WorkerError", "epoch": record.epoch, "index": record.index,
                    "message": "the batch failed; its details were lost with the connection"}))
            else:
                return
            self._held.popleft()
            arrivals.append(arrival)


def open_arrivals(connection: Connection, welcome: protocol.WelcomeMsg, mapping: RingMapping | None,
                  ack_every: int) -> FrameArrivals | DescriptorArrivals:
    """The source of a feed that WELCOME ``welcome`` greeted, that maps the ring (``mapping``) or
    does not (None) and ACKs every ``ack_every`` batches: a mailbox if the server offers one and
    this machine's memory ordering allows it (``mailbox.supported``)."""
    layout = welcome.layout
    if mapping is None:
        return FrameArrivals(connection, len(layout.fields))
    if welcome.mailbox is None or not mailbox.supported():
        return DescriptorArrivals(connection, layout.slots)
    k, token = welcome.mailbox
    box = mailbox.open_mailbox(mapping.base, layout.mailbox_offset, layout.mailbox_capacity, k)
    box.attach(token)
    return MailboxArrivals(connection, layout.slots, box, ack_every)
