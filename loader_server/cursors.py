"""Streams and the clients that read them: pure bookkeeping, no sockets.

A ``Job`` is one stream of batch numbers (``seq``), optionally a shard
``(i, n)``: batch indices i, i+n, i+2n, ... of every epoch, which is how one
client fans in from several servers. Clients that name the same job share its
cursor, so each batch goes to exactly one of them. A client without a job name
has a private one.

Each ``ClientCursor`` keeps the seqs assigned to it in a heap and delivers them
in order (or as they finish when unordered); a batch that failed is delivered
as its ``Failure``, at its place in the stream. Seqs a departing client never
received go back to its job, to be recomputed for another member.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass
class Job:
    name: str | None
    start: int  # shard-local seq of the first batch
    shard: tuple[int, int]
    steps_per_epoch: int
    next_seq: int = 0
    retask: deque = field(default_factory=deque)
    members: int = 0
    per_epoch: int = field(init=False)  # the job's batches per epoch: its shard's indices

    def __post_init__(self) -> None:
        i, n = self.shard
        self.per_epoch = len(range(i, self.steps_per_epoch, n))

    def position(self, seq: int) -> tuple[int, int]:
        """(epoch, index) of the job's ``seq``-th batch."""
        epoch, k = divmod(self.start + seq, self.per_epoch)
        return epoch, self.shard[0] + k * self.shard[1]

    def take_seq(self) -> int:
        if self.retask:
            return self.retask.popleft()
        self.next_seq += 1
        return self.next_seq - 1


@dataclass(frozen=True)
class Failure:
    """Why a batch could not be made: a worker's error report, or ``WorkerCrash``. The
    optional details are a worker's JSON values, passed on as they came."""
    kind: str
    message: str
    traceback: Any = None
    sample: Any = None
    position: Any = None
    worker_pid: Any = None


class Delivery(NamedTuple):
    """One place in a client's stream: a READY slot (``failure`` None) or the failure that
    takes the batch's place (``slot`` None). ``copy``: the client must copy the slot out."""
    seq: int
    epoch: int
    index: int
    slot: int | None = None
    failure: Failure | None = None
    copy: bool = False


@dataclass
class ClientCursor:
    identity: bytes
    job: Job
    credit: int
    frames: bool = False  # batch bytes travel in the message (no shared memory)
    started: bool = False  # MODE received
    assigned: list = field(default_factory=list)  # heap of seqs being made for it, not yet delivered
    ready: dict = field(default_factory=dict)  # seq -> Delivery, not yet sent
    leased: set = field(default_factory=set)  # slots delivered zero-copy, not yet released

    @property
    def hungry(self) -> bool:
        return self.started and self.credit > len(self.assigned)

    @property
    def held(self) -> int:
        """Slots and failures the client holds or is owed: what it gives back when it goes."""
        return len(self.leased) + len(self.ready)

    def assign(self, seq: int) -> None:
        heapq.heappush(self.assigned, seq)

    def unassign(self, seq: int) -> None:
        self.assigned.remove(seq)
        heapq.heapify(self.assigned)

    def next_deliverable(self, ordered: bool) -> int | None:
        if ordered:
            return self.assigned[0] if self.assigned and self.assigned[0] in self.ready else None
        return next(iter(self.ready), None)

    def delivered(self, seq: int) -> Delivery:
        """Take ``seq`` off the ready and assigned lists."""
        if self.assigned[0] == seq:
            heapq.heappop(self.assigned)
        else:
            self.unassign(seq)
        self.credit -= 1  # a failure takes its batch's place in the stream, and its credit
        return self.ready.pop(seq)
