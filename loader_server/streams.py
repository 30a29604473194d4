"""Streams and the clients that read them: pure bookkeeping, no sockets.

A ``Job`` is one stream of batch numbers (``seq``), optionally a shard
``(i, n)``: batch indices i, i+n, i+2n, ... of every epoch, which is how one
client fans in from several servers. Clients that name the same job share its
cursor, so each batch goes to exactly one of them. A client without a job name
has a private one.

Each ``ClientState`` keeps the seqs assigned to it in a heap and delivers them
in order (or as they finish when unordered); a batch that failed is delivered
as its error, at its place in the stream. Seqs a departing client never
received go back to its job, to be recomputed for another member.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Job:
    name: str | None
    start: int  # shard-local seq of the first batch
    shard: tuple[int, int]
    steps_per_epoch: int
    next_seq: int = 0
    retask: deque = field(default_factory=deque)
    members: int = 0

    @property
    def per_epoch(self) -> int:
        i, n = self.shard
        return len(range(i, self.steps_per_epoch, n))

    def position(self, seq: int) -> tuple[int, int]:
        """(epoch, index) of the job's ``seq``-th batch."""
        epoch, k = divmod(self.start + seq, self.per_epoch)
        return epoch, self.shard[0] + k * self.shard[1]

    def take_seq(self) -> int:
        if self.retask:
            return self.retask.popleft()
        self.next_seq += 1
        return self.next_seq - 1


@dataclass
class ClientState:
    identity: bytes
    job: Job
    credit: int
    last_seen: float
    local_pid: int | None  # set when the client shares our pid namespace over ipc
    pid_checked_at: float = 0.0
    frames: bool = False  # batch bytes travel in the message (no shared memory)
    mailbox_id: int | None = None  # offered in WELCOME
    mailbox: object = None  # client.mailbox.Mailbox, once MODE chose it
    started: bool = False  # MODE received
    assigned: list = field(default_factory=list)  # heap of seqs being made for it, not yet delivered
    ready: dict = field(default_factory=dict)  # seq -> READY slot, or the ERROR frames that replace it
    leased: set = field(default_factory=set)  # slots delivered zero-copy, not yet released

    @property
    def hungry(self) -> bool:
        return self.started and self.credit > len(self.assigned)

    def assign(self, seq: int) -> None:
        heapq.heappush(self.assigned, seq)

    def unassign(self, seq: int) -> None:
        self.assigned.remove(seq)
        heapq.heapify(self.assigned)

    def next_deliverable(self, ordered: bool) -> int | None:
        if ordered:
            return self.assigned[0] if self.assigned and self.assigned[0] in self.ready else None
        return next(iter(self.ready), None)

    def delivered(self, seq: int):
        """Take ``seq`` off the ready and assigned lists; return its slot, or its error's frames."""
        if self.assigned[0] == seq:
            heapq.heappop(self.assigned)
        else:
            self.unassign(seq)
        self.credit -= 1  # an error takes its batch's place in the stream, and its credit
        return self.ready.pop(seq)
