"""The scheduler: every slot's state, leases, clients' cursors, jobs and tasks, as a pure
state machine. No sockets, no processes, no clock: the broker turns messages into the
event methods below and the effects they return (``SendTasks``, ``Deliver``) into frames.

Slot states (``ring.SlotState``) change here only::

    FREE -> FILLING(worker) -> READY -> LEASED(client) -> FREE

A slot is FREE exactly when it is on the free list. A LEASED slot is in one
client's ``leased`` set (a descriptor the client maps) or in ``sending`` (its
bytes are on the wire to a frames client, until the broker says they are gone).

A dead worker's slots are freed and its batches recomputed first. Each of
them is then a suspect: it runs alone on a worker with nothing else in flight,
so a batch that keeps killing workers is found exactly, and only after
``MAX_DEATHS_PER_BATCH`` deaths is it delivered as a ``WorkerCrash`` failure at
its place in the stream.

An event that does not fit the state (a slot the worker is not filling, a
release of a slot the client does not hold, an unknown id) raises
``ProtocolError`` and changes nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ringfeed.protocol import ProtocolError

from .cursors import ClientCursor, Delivery, Failure, Job
from .ring import SlotState
from .worker_protocol import TaskMsg

WORKER_INFLIGHT = 16  # a feed's default credit: one worker alone can hold all of it
MAX_DEATHS_PER_BATCH = 3


@dataclass(slots=True)
class Slot:
    state: SlotState = SlotState.FREE
    worker: int | None = None
    owner: ClientCursor | None = None  # the client it is made for: that cursor, not its identity
    seq: int = -1
    epoch: int = -1
    index: int = -1


@dataclass(slots=True)
class WorkerState:
    ready: bool = False  # said W_HELLO
    inflight: set = field(default_factory=set)
    isolated: bool = False  # running a suspect batch alone


class Task(NamedTuple):
    client: bytes
    seq: int


class SendTasks(NamedTuple):
    worker: int
    tasks: tuple[TaskMsg, ...]


class Deliver(NamedTuple):
    """What ``client`` gets now, in stream order, as slot descriptors or (``frames``) as the
    slots' bytes; ``credit`` and ``more_coming`` (batches still being made for it) as they are
    once these are taken."""
    client: bytes
    items: tuple[Delivery, ...]
    frames: bool
    credit: int
    more_coming: bool


class Scheduler:
    def __init__(self, slots: int, workers, steps_per_epoch: int, ordered: bool):
        """``workers``: the ids of the workers started; each is ready once it says so."""
        self.steps = steps_per_epoch
        self.ordered = ordered
        self.slots = [Slot() for _ in range(slots)]
        self.free = deque(range(slots))
        self.max_credit = max(1, slots // 2)
        self.workers = {wid: WorkerState() for wid in workers}
        self.clients: dict[bytes, ClientCursor] = {}
        self.jobs: dict[str, Job] = {}
        self.retask: deque[Task] = deque()
        self.deaths: dict[Task, int] = {}
        self.sending: set[int] = set()  # LEASED slots whose bytes are on the wire
        self.pending: dict[bytes, None] = {}  # clients with batches that became ready (ordered set)
        self.leased = 0  # slots in clients' leased sets; changed by _lease alone
        self.served = 0
        self.skipped = 0

    # -- clients ---------------------------------------------------------

    def check_start(self, shard: tuple[int, int], index: int) -> None:
        """A HELLO's start must be a batch of its shard; raises ``ProtocolError``."""
        i, n = shard
        if not 0 <= i < n or not 0 <= index < self.steps or index % n != i:
            raise ProtocolError(f"HELLO: start index {index} is not in shard ({i}, {n}) of an epoch "
                                f"of {self.steps} batches")
        if n > self.steps:
            raise ProtocolError(f"HELLO: {n} shards of an epoch of only {self.steps} batches")

    def join(self, identity: bytes, job_name: str | None, shard: tuple[int, int], epoch: int, index: int,
             credit: int) -> ClientCursor:
        """A new client, reading job ``job_name`` (shared) or a private stream from (epoch, index)."""
        self.check_start(shard, index)
        if identity in self.clients:
            raise ProtocolError(f"HELLO from client {identity!r}, which is already joined")
        if epoch < 0 or credit < 0:
            raise ProtocolError(f"HELLO: epoch {epoch} and credit {credit} must not be negative")
        job = self.jobs.get(job_name) if job_name is not None else None
        if job is None or job.shard != shard:
            i, n = shard
            job = Job(job_name, 0, shard, self.steps)
            job.start = epoch * job.per_epoch + (index - i) // n
            if job_name is not None:
                self.jobs[job_name] = job
        job.members += 1
        client = self.clients[identity] = ClientCursor(identity, job, min(credit, self.max_credit))
        return client

    def start(self, identity: bytes, frames: bool) -> None:
        """MODE: the client wants batches now, as frames or as slot descriptors."""
        client = self._client(identity)
        client.frames, client.started = frames, True

    def ack(self, identity: bytes, credit: int, releases: tuple[int, ...]) -> None:
        """More credit, and slots the client is done with."""
        client = self._client(identity)
        if credit < 0:
            raise ProtocolError(f"ACK: credit {credit} is negative")
        unheld = [s for s in releases if s not in client.leased]
        if unheld or len(set(releases)) != len(releases):
            slot = unheld[0] if unheld else releases[0]
            raise ProtocolError(f"ACK releases slot {slot}, which this client does not hold")
        client.credit = min(client.credit + credit, self.max_credit)
        for slot_id in releases:
            self._lease(client, slot_id, held=False)
            self._free(slot_id)

    def drop(self, identity: bytes) -> None:
        """The client is gone: its slots come back, seqs it never received go to its job."""
        client = self._client(identity)
        del self.clients[identity]
        self.pending.pop(identity, None)
        job = client.job
        job.members -= 1
        if job.members:
            job.retask.extend(sorted(client.assigned))  # another member gets them
        elif self.jobs.get(job.name) is job:  # a job by that name with other shards may have replaced it
            del self.jobs[job.name]
        for slot_id in list(client.leased):
            self._lease(client, slot_id, held=False)
            self._free(slot_id)
        for item in client.ready.values():
            if item.slot is not None:
                self._free(item.slot)
        self.retask = deque(t for t in self.retask if t.client != identity)
        self.deaths = {t: n for t, n in self.deaths.items() if t.client != identity}

    def sent(self, slot_id: int) -> None:
        """The bytes of a slot delivered as frames are gone: the slot is free."""
        if slot_id not in self.sending:
            raise ProtocolError(f"slot {slot_id} is not being sent")
        self.sending.discard(slot_id)
        self._free(slot_id)

    def starved(self) -> bool:
        """Clients hold every slot, and one of them wants a batch."""
        return self.leased >= len(self.slots) and any(c.hungry for c in self.clients.values())

    def _client(self, identity: bytes) -> ClientCursor:
        client = self.clients.get(identity)
        if client is None:
            raise ProtocolError(f"client {identity!r} is not joined")
        return client

    # -- workers ---------------------------------------------------------

    def worker_ready(self, worker_id: int) -> bool:
        """W_HELLO: the worker may get tasks. True once every worker has said it."""
        self._worker(worker_id).ready = True
        return all(w.ready for w in self.workers.values())

    def worker_unready(self, worker_id: int) -> None:
        """The worker is being killed: no more tasks for it."""
        if worker_id in self.workers:
            self.workers[worker_id].ready = False

    def busy(self, worker_id: int) -> bool:
        return bool(self._worker(worker_id).inflight)

    def done(self, worker_id: int, slot_id: int, skipped: int) -> None:
        """The worker made the batch in ``slot_id`` (``skipped`` samples replaced)."""
        if skipped < 0:
            raise ProtocolError(f"worker {worker_id} reported {skipped} skipped samples")
        slot = self._take_slot(worker_id, slot_id)
        self.skipped += skipped
        client = self._owner(slot)
        if client is None:
            self._free(slot_id)
            return
        self.deaths.pop(Task(client.identity, slot.seq), None)
        slot.state, slot.worker = SlotState.READY, None
        client.ready[slot.seq] = Delivery(slot.seq, slot.epoch, slot.index, slot=slot_id)
        self.pending[client.identity] = None

    def error(self, worker_id: int, slot_id: int, failure: Failure) -> None:
        """The batch in ``slot_id`` failed: ``failure`` takes its place in the stream."""
        slot = self._take_slot(worker_id, slot_id)
        client = self._owner(slot)
        self._free(slot_id)
        if client is not None:
            self.deaths.pop(Task(client.identity, slot.seq), None)
            client.ready[slot.seq] = Delivery(slot.seq, slot.epoch, slot.index, failure=failure)
            self.pending[client.identity] = None

    def worker_exit(self, worker_id: int) -> None:
        """The worker died: its slots are freed and its batches go first, each as a suspect."""
        state = self._worker(worker_id)
        for slot_id in sorted(state.inflight, key=lambda s: self.slots[s].seq):
            slot = self.slots[slot_id]
            client = self._owner(slot)
            if client is not None:  # else its seq went back to the job when it left
                task = Task(client.identity, slot.seq)
                self.deaths[task] = self.deaths.get(task, 0) + 1
                self.retask.append(task)
            self._free(slot_id)
        self.workers[worker_id] = WorkerState()

    def retire_worker(self, worker_id: int) -> bool:
        """The dead worker (``worker_exit`` first) is not replaced; True while some worker is left."""
        if self._worker(worker_id).inflight:
            raise ProtocolError(f"worker {worker_id} still has tasks; it must exit before it is retired")
        del self.workers[worker_id]
        return bool(self.workers)

    def fail_poison_batches(self, exit_code) -> None:
        """Batches that killed ``MAX_DEATHS_PER_BATCH`` workers are delivered as a WorkerCrash."""
        for task in [t for t in self.retask if self.deaths.get(t, 0) >= MAX_DEATHS_PER_BATCH]:
            self.retask.remove(task)
            self.deaths.pop(task)
            client = self.clients[task.client]
            epoch, index = client.job.position(task.seq)
            failure = Failure("WorkerCrash", f"batch (epoch {epoch}, index {index}) killed "
                              f"{MAX_DEATHS_PER_BATCH} workers; the last exited with code {exit_code}")
            client.ready[task.seq] = Delivery(task.seq, epoch, index, failure=failure)
            self.pending[client.identity] = None

    def _worker(self, worker_id: int) -> WorkerState:
        state = self.workers.get(worker_id)
        if state is None:
            raise ProtocolError(f"worker {worker_id} is not known")
        return state

    def _owner(self, slot: Slot) -> ClientCursor | None:
        """The client a slot is made for, while it is still joined: a client that left and
        said HELLO again under the same identity is a new client with a new stream."""
        client = slot.owner
        return client if client is not None and self.clients.get(client.identity) is client else None

    def _take_slot(self, worker_id: int, slot_id: int) -> Slot:
        worker = self._worker(worker_id)
        if not 0 <= slot_id < len(self.slots) or slot_id not in worker.inflight:
            raise ProtocolError(f"worker {worker_id} reported slot {slot_id}, which it is not filling")
        worker.inflight.discard(slot_id)
        worker.isolated = worker.isolated and bool(worker.inflight)
        return self.slots[slot_id]

    # -- tasks -----------------------------------------------------------

    def active_workers(self, limit: int | None) -> list[tuple[int, WorkerState]]:
        """The ready workers that may get tasks: all of them, or the ``limit`` lowest ids
        (``workers = "auto"``: the others stay warm, idle on their links)."""
        ready = [(wid, w) for wid, w in self.workers.items() if w.ready]
        return ready if limit is None else sorted(ready, key=lambda item: item[0])[:limit]

    def schedule(self, limit: int | None = None) -> list[SendTasks]:
        """Hand out tasks while there are free slots, idle workers and wanted batches;
        each worker gets its share in one ``SendTasks``."""
        if not self.free:  # the broker asks on every pass of its loop
            return []
        batches: dict[int, list[TaskMsg]] = {}
        active = self.active_workers(limit)
        while self.free:
            idle = [(len(w.inflight), wid) for wid, w in active
                    if not w.isolated and len(w.inflight) < WORKER_INFLIGHT]
            if not idle:
                break
            task = self._next_task()
            if task is None:
                break
            load, worker_id = min(idle)
            if task in self.deaths:  # a suspect waits for a worker with nothing else to do
                if load:
                    self.retask.appendleft(task)
                    break
                self.workers[worker_id].isolated = True
            client = self.clients[task.client]
            epoch, index = client.job.position(task.seq)
            slot_id = self.free.pop()  # with plain stores, the most recently freed slot is the likeliest cached
            self.slots[slot_id] = Slot(SlotState.FILLING, worker_id, client, task.seq, epoch, index)
            self.workers[worker_id].inflight.add(slot_id)
            batches.setdefault(worker_id, []).append(TaskMsg(slot_id, epoch, index))
        return [SendTasks(wid, tuple(tasks)) for wid, tasks in batches.items()]

    def _next_task(self) -> Task | None:
        while self.retask:
            task = self.retask.popleft()
            if task.client in self.clients:
                return task
        hungry = [c for c in self.clients.values() if c.hungry]
        if hungry and self._remote_slots() >= self.max_credit:  # frames clients share half the ring
            hungry = [c for c in hungry if not c.frames]
        if not hungry:
            return None
        client = min(hungry, key=lambda c: len(c.assigned) - c.credit)
        seq = client.job.take_seq()
        client.assign(seq)
        return Task(client.identity, seq)

    def _remote_slots(self) -> int:
        """Slots held for clients that get frames: being made for them, or still being sent.
        A peer that stops reading its socket holds its frames' slots until it disconnects."""
        return len(self.sending) + sum(len(c.assigned) for c in self.clients.values() if c.frames)

    # -- delivery --------------------------------------------------------

    def deliver(self) -> list[Deliver]:
        """What every client that got batches since the last call can be sent now."""
        if not self.pending:  # the broker asks on every pass of its loop
            return []
        pending, self.pending = self.pending, {}
        effects = [self._deliver(self.clients[identity]) for identity in pending]
        return [effect for effect in effects if effect.items]

    def _deliver(self, client: ClientCursor) -> Deliver:
        items = []
        while (seq := client.next_deliverable(self.ordered)) is not None:
            item = client.delivered(seq)
            if item.slot is not None:
                self.slots[item.slot].state = SlotState.LEASED
                if client.frames:
                    self.sending.add(item.slot)
                else:
                    self._lease(client, item.slot, held=True)
                    # Keep enough slots out of client hands for every worker to keep filling.
                    if self.leased > len(self.slots) - len(self.workers):
                        item = item._replace(copy=True)
                self.served += 1
            items.append(item)
        return Deliver(client.identity, tuple(items), client.frames, client.credit, bool(client.assigned))

    # -- slots -----------------------------------------------------------

    def _lease(self, client: ClientCursor, slot_id: int, held: bool) -> None:
        """The one place a lease starts or ends, so ``leased`` is their count."""
        if held:
            client.leased.add(slot_id)
            self.leased += 1
        else:
            client.leased.discard(slot_id)
            self.leased -= 1

    def _free(self, slot_id: int) -> None:
        self.slots[slot_id] = Slot()
        self.free.append(slot_id)

    def slot_counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in SlotState}
        for slot in self.slots:
            counts[slot.state.value] += 1
        return counts
