"""The broker: one ZeroMQ poll loop that owns every slot's state.

Clients talk to the frontend ROUTER; each worker has a socketpair of its own
(``channel.py``), polled next to the worker's process sentinel. Each pass of
the loop handles what arrived, then ``_schedule`` hands tasks to warm workers
with spare capacity while there are FREE slots and started clients with
unused credit, and ``_deliver`` sends READY slots to their client in batch
order (or as they finish, when ``ordered`` is off).

Delivery is a slot descriptor for clients that map the ring: written to the
client's shared-memory mailbox ("mailbox" mode, with a WAKE message only when
the client sleeps) or sent in a BATCHES message ("shm" mode). Clients on other
hosts get the slot's bytes as ``copy=False`` frames ("frames" mode); such a
slot is freed once ZeroMQ's tracker says the bytes are gone.

A dead worker's slots are freed and its batches recomputed first. Each of
them is then a suspect: it runs alone on a worker with nothing else in flight,
so a batch that keeps killing workers is found exactly, and only after
``MAX_DEATHS_PER_BATCH`` deaths is it reported as a ``WorkerCrash``. A worker
that makes no progress past its deadline (``deadlines.py``) is killed and
counts as dead. A replacement that cannot be started (out of file
descriptors, say) is retried every ``RESTART_RETRY_S``. Once no worker is
left, the service has failed: every client, new ones included, is told why,
``status`` says so, and the loop ends after ``FAILED_LINGER_S``.

A client that is gone (its process, over ipc; ``1.5 * heartbeat_s`` of
silence otherwise) loses its slots, batches it never received return to its
job, and it is told (ERROR "Expired"), so a live one says HELLO again. A
message from a client that raises anything while it is handled costs that
client its session, never the loop.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from client import protocol
from client.paths import pid_namespace
from client.protocol import BatchMsg, ProtocolError, TaskMsg

from .autotune import AutoWorkers
from .channel import ChannelError
from .config import AUTO_WORKERS, Config
from .deadlines import ProgressClock
from .metrics import IDLE_WORKER, Metrics
from .pool import RestartLimitError, WorkerPool
from .procs import pid_alive
from .ratelimit import LogLimiter
from .ring import Ring, SlotState
from .streams import ClientState, Job

log = logging.getLogger("ringfeed.broker")

TICK_S = 0.1
TRANSIT_POLL_S = 0.0005  # the first look at frames on the wire; each look that frees nothing waits twice as long,
TRANSIT_POLL_MAX_S = 0.008  # up to this: a large batch takes milliseconds to send, and each wake costs CPU
WORKER_INFLIGHT = 16  # a feed's default credit: one worker alone can hold all of it
CLIENT_TIMEOUT_FACTOR = 1.5
LOCAL_CLIENT_SILENCE_S = 60.0
MAX_DEATHS_PER_BATCH = 3
STARVED_WARNING_S = 10.0
LOCAL_PID_CHECK_S = 1.0  # how often a local client's pid is looked up in /proc
RESTART_RETRY_S = 1.0
FAILED_LINGER_S = 10.0  # a failed service answers clients and status this long, then exits
PEER_LOG_EVERY_S = 5.0  # log lines a peer can cause, at most one per this interval
STATUS_MAX_WORKERS = 256  # per-worker figures in a status reply: it must fit protocol.MAX_JSON_BYTES


@dataclass
class Slot:
    state: SlotState = SlotState.FREE
    worker: int | None = None
    client: bytes | None = None
    job: Job | None = None
    seq: int = -1
    epoch: int = -1
    index: int = -1


@dataclass
class WorkerState:
    ready: bool = False  # said W_HELLO
    inflight: set = field(default_factory=set)
    isolated: bool = False  # running a suspect batch alone


@dataclass(frozen=True)
class Retask:
    client: bytes
    seq: int


class Broker:
    def __init__(self, config: Config, ring: Ring, pool: WorkerPool, frontend: zmq.Socket,
                 welcome: dict, on_ready, housekeeping=(), watched=None):
        """``housekeeping``: callables run every ``TICK_S``; ``watched``: {socket: handler} of
        other sockets to poll, each handler called when its socket is readable."""
        self.config, self.ring, self.layout, self.pool = config, ring, ring.layout, pool
        self.frontend = frontend
        self.housekeeping = tuple(housekeeping)
        self.watched = dict(watched or {})
        self.welcome = welcome
        self.steps = welcome["steps_per_epoch"]
        self.on_ready = on_ready
        self.is_ready = False
        self.slots = [Slot() for _ in range(self.layout.slots)]
        self.free = deque(range(self.layout.slots))
        self.workers = {wid: WorkerState() for wid in pool.procs}
        self.clients: dict[bytes, ClientState] = {}
        self.jobs: dict[str, Job] = {}
        self.retask: deque[Retask] = deque()
        self.deaths: dict[Retask, int] = {}
        self.pending_delivery: set[bytes] = set()  # clients with batches that became ready this pass
        self.free_mailboxes = deque(range(len(ring.mailboxes)))
        self.in_transit: list = []  # (zmq MessageTracker, slot) of batches sent as frames
        self.transit_poll_s = TRANSIT_POLL_S
        self.leased = 0  # shm slots in client hands
        self.served = 0
        self.skipped = 0
        self.protocol_errors = 0
        self.started = time.monotonic()
        self.metrics = Metrics(time.monotonic)
        self.status_extra: dict = {}  # more status keys, set by the service (the metrics URL)
        self.last_ping = 0.0
        self.last_starved_warning = time.monotonic()
        self.max_credit = max(1, self.layout.slots // 2)
        self.progress = ProgressClock(config.task_timeout_s)
        # workers = "auto": tasks go only to as many of the lowest ids as the tuner says
        self.auto = AutoWorkers(len(self.workers), time.monotonic()) if config.workers == AUTO_WORKERS else None
        self.unstarted: set[int] = set()  # workers whose replacement could not be started yet
        self.next_restart_retry = 0.0
        self.rebuild_poller = False
        self.failure: str | None = None  # why the service cannot serve (no workers left)
        self.failed_at = 0.0
        self.peer_log = LogLimiter(log, PEER_LOG_EVERY_S)
        # Client pids are trusted for liveness only over ipc, where only our own user can connect.
        self.pidns = pid_namespace() if config.endpoint.startswith("ipc://") else None

    # -- main loop -------------------------------------------------------

    def run(self, should_stop) -> None:
        poller, sentinels, links = self._poller()
        next_housekeeping = 0.0
        while not should_stop() and not self._failed_long_enough():
            # Trackers have no fd: while batches are on the wire, look at them often.
            events = dict(poller.poll(self.transit_poll_s * 1000 if self.in_transit else TICK_S * 1000))
            for fd, wid in list(links.items()):
                if fd in events and not self._drain_worker(wid):
                    poller.unregister(fd)  # at its end for good; the worker's sentinel reports its exit
                    del links[fd]
            self._deliver_pending()
            for sock, handler in self.watched.items():
                if sock in events:
                    handler()
            if self.frontend in events:
                self._drain(self.frontend, self._on_client_message)
            exited = [wid for fd, wid in sentinels.items() if fd in events]
            for wid in exited:
                self._on_worker_exit(wid)
            if exited or self.rebuild_poller:
                poller, sentinels, links = self._poller()
                self.rebuild_poller = False
                self._deliver_pending()
            if self.in_transit:
                self._reap_transit()
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + TICK_S
                self._expire_clients()
                self._ping_clients()
                self._warn_if_starved(now)
                self._kill_hung_workers(now)
                self._retry_starts(now)
                if self.auto is not None:
                    self.auto.tick(now, self.served, len(self.free), self.metrics.take_interval())
                for task in self.housekeeping:
                    task()
            self._schedule()

    def _failed_long_enough(self) -> bool:
        if self.failure is None:
            return False
        if not self.is_ready:  # failed during start-up: nobody to tell
            raise RuntimeError(self.failure)
        return time.monotonic() - self.failed_at > FAILED_LINGER_S

    def _poller(self) -> tuple[zmq.Poller, dict[int, int], dict[int, int]]:
        """A poller over the frontend and every worker's link and sentinel, and which worker
        each fd is (rebuilt when workers change)."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        for sock in self.watched:
            poller.register(sock, zmq.POLLIN)
        sentinels = self.pool.sentinels()
        links = {link.fileno(): wid for wid, link in self.pool.channels.items()}
        for fd in [*sentinels, *links]:
            poller.register(fd, zmq.POLLIN)
        return poller, sentinels, links

    def stop_workers(self) -> None:
        for worker_id in self.pool.channels:
            self._send_worker(worker_id, [protocol.STOP])

    def _send_worker(self, worker_id: int, frames: list[bytes]) -> None:
        try:
            self.pool.channels[worker_id].send(frames)
        except ChannelError as exc:
            self._kill_worker(worker_id, exc)

    def _kill_worker(self, worker_id: int, reason) -> None:
        """A worker whose link failed gets no more tasks and is killed; its sentinel then
        reports the death, and its batches are recomputed."""
        log.warning("worker %d: %s; killing it", worker_id, reason)
        if worker_id in self.workers:
            self.workers[worker_id].ready = False
        self.pool.kill(worker_id)

    def _drain(self, sock: zmq.Socket, handler) -> None:
        for _ in range(1000):  # bounded, so one busy side cannot starve the other
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    # -- workers ---------------------------------------------------------

    def _drain_worker(self, worker_id: int) -> bool:
        """Handle what the worker sent; False once its link is closed or broken (the worker is
        then killed: while the broker runs, a worker never closes its end on its own)."""
        link = self.pool.channels[worker_id]
        try:
            for frames in link.receive():
                self._on_worker_message(worker_id, frames)
        except ChannelError as exc:
            self.protocol_errors += 1
            self._kill_worker(worker_id, exc)
            return False
        if link.closed:
            self._kill_worker(worker_id, "its link closed")
        return not link.closed

    def _on_worker_message(self, worker_id: int, frames: list[bytes]) -> None:
        command = frames[0] if frames else b""
        try:
            if command == protocol.W_HELLO:
                self._on_worker_hello(worker_id, *protocol.parse_worker_hello(frames))
            elif command == protocol.W_DONE:
                done = protocol.parse_worker_done(frames)
                for slot_id, skipped in done:
                    self._on_worker_done(worker_id, slot_id, skipped)
                self._progressed(worker_id, len(done))
            elif command == protocol.W_ERROR:
                self._on_worker_error(worker_id, *protocol.parse_worker_error(frames))
                self._progressed(worker_id, 1)
            else:
                raise ProtocolError(f"unknown worker command {command[:32]!r}")
        except ProtocolError as exc:
            self.protocol_errors += 1
            log.warning("bad message from worker %d: %s", worker_id, exc)
        except Exception:  # a bug met on this worker's message: lose the worker, not the service
            self.protocol_errors += 1
            log.exception("handling %r from worker %d failed", command[:32], worker_id)
            self._kill_worker(worker_id, "its message could not be handled")

    def _progressed(self, worker_id: int, batches: int) -> None:
        self.progress.progressed(worker_id, batches, time.monotonic(), bool(self.workers[worker_id].inflight))
        self.metrics.worker_progressed(worker_id, batches, bool(self.workers[worker_id].inflight))

    def _on_worker_hello(self, worker_id: int, claimed_id: int, pid: int) -> None:
        if claimed_id != worker_id or self.pool.pid(worker_id) != pid:
            raise ProtocolError(f"W_HELLO on worker {worker_id}'s link claims worker {claimed_id} (pid {pid})")
        self.workers[worker_id].ready = True
        if not self.is_ready and all(w.ready for w in self.workers.values()):
            self.is_ready = True
            self.metrics = Metrics(time.monotonic)  # rates since start count from when clients can come
            self.on_ready()

    def _slot_of_worker(self, worker_id: int, slot: int) -> Slot:
        if not 0 <= slot < len(self.slots) or slot not in self.workers[worker_id].inflight:
            raise ProtocolError(f"worker {worker_id} reported slot {slot}, which it is not filling")
        worker = self.workers[worker_id]
        worker.inflight.discard(slot)
        worker.isolated = worker.isolated and bool(worker.inflight)
        return self.slots[slot]

    def _on_worker_done(self, worker_id: int, slot_id: int, skipped: int) -> None:
        slot = self._slot_of_worker(worker_id, slot_id)
        self.skipped += skipped
        client = self.clients.get(slot.client)
        self.deaths.pop(Retask(slot.client, slot.seq), None)
        if client is None:
            self._free(slot_id)
            return
        slot.state, slot.worker = SlotState.READY, None
        client.ready[slot.seq] = slot_id
        self.pending_delivery.add(client.identity)

    def _on_worker_error(self, worker_id: int, slot_id: int, details: dict) -> None:
        slot = self._slot_of_worker(worker_id, slot_id)
        client = self.clients.get(slot.client)
        self._free(slot_id)
        if client is not None:
            client.ready[slot.seq] = protocol.error(
                details["kind"], details["message"], traceback=details.get("traceback"),
                epoch=slot.epoch, index=slot.index, sample=details.get("sample"),
                position=details.get("position"), worker_pid=details.get("worker_pid"))
            self.pending_delivery.add(client.identity)

    def _on_worker_exit(self, worker_id: int) -> None:
        state = self.workers[worker_id]
        for slot_id in sorted(state.inflight, key=lambda s: self.slots[s].seq):
            slot = self.slots[slot_id]
            if slot.client in self.clients:  # else its seq went back to the job when it left
                task = Retask(slot.client, slot.seq)
                self.deaths[task] = self.deaths.get(task, 0) + 1
                self.retask.append(task)
            self._free(slot_id)
        self.workers[worker_id] = WorkerState()
        self.progress.forget(worker_id)
        self.metrics.worker_gone(worker_id)
        try:
            code = self.pool.replace_dead(worker_id)
        except RestartLimitError as exc:
            del self.workers[worker_id]
            log.error("not replacing worker %d: %s", worker_id, exc)
            if not self.workers:
                self._fail(f"no workers left: {exc}")
            return
        except OSError as exc:  # EMFILE, ENOMEM: the restart is counted; its start is retried
            self._cannot_start(worker_id, exc)
            return
        self._fail_poison_batches(code)

    def _cannot_start(self, worker_id: int, exc: OSError) -> None:
        self.unstarted.add(worker_id)
        log.error("cannot start a replacement for worker %d (%s); retrying every %.0f s",
                  worker_id, exc, RESTART_RETRY_S)

    def _retry_starts(self, now: float) -> None:
        if not self.unstarted or now < self.next_restart_retry:
            return
        self.next_restart_retry = now + RESTART_RETRY_S
        for worker_id in sorted(self.unstarted):
            try:
                self.pool.start(worker_id)
            except OSError as exc:
                self.peer_log.log(logging.ERROR, "worker %d still cannot be started: %s", worker_id, exc)
                continue
            self.unstarted.discard(worker_id)
            self.rebuild_poller = True
            log.info("started the replacement for worker %d", worker_id)

    def _kill_hung_workers(self, now: float) -> None:
        for worker_id, stalled_s in self.progress.overdue(now):
            self.progress.forget(worker_id)  # killed once; its sentinel reports the death
            tasks = len(self.workers[worker_id].inflight)
            self._kill_worker(worker_id, f"no progress for {stalled_s:.1f} s on {tasks} task(s), past its "
                                         f"deadline of {self.progress.deadline_s:.1f} s (task_timeout_s, or "
                                         "10x the recent time per batch)")

    def _fail(self, reason: str) -> None:
        """No workers are left: tell every client, and refuse new ones, with ``reason``."""
        self.failure, self.failed_at = reason, time.monotonic()
        log.error("the service has failed: %s; exiting in %.0f s", reason, FAILED_LINGER_S)
        for client in list(self.clients.values()):
            self._send_client(client.identity, protocol.error("WorkerError", reason))
            self._drop_client(client)

    def _fail_poison_batches(self, exit_code) -> None:
        for task in [t for t in self.retask if self.deaths.get(t, 0) >= MAX_DEATHS_PER_BATCH]:
            self.retask.remove(task)
            self.deaths.pop(task)
            client = self.clients[task.client]
            epoch, index = client.job.position(task.seq)
            client.ready[task.seq] = protocol.error(
                "WorkerCrash", f"batch (epoch {epoch}, index {index}) killed {MAX_DEATHS_PER_BATCH} "
                f"workers; the last exited with code {exit_code}", epoch=epoch, index=index)
            self.pending_delivery.add(client.identity)

    # -- clients ---------------------------------------------------------

    def _on_client_message(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        command = body[0] if body else b""
        try:
            self._handle_client(identity, command, body)
        except ProtocolError as exc:
            self.protocol_errors += 1
            self._send_client(identity, protocol.error("ProtocolError", str(exc)))
        except Exception as exc:  # a bug met on this message: it costs this client its session only
            self.protocol_errors += 1
            log.exception("handling %r from client %r failed; dropping the client", command[:32], identity)
            if identity in self.clients:
                self._drop_client(self.clients[identity])
            self._send_client(identity, protocol.error("ServerError", f"the server could not handle {command[:32]!r}: "
                                                       f"{type(exc).__name__}: {exc}"))

    def _handle_client(self, identity: bytes, command: bytes, body: list[bytes]) -> None:
        client = self.clients.get(identity)
        if command == protocol.HELLO:
            self._on_hello(identity, protocol.parse_hello(body))
        elif command == protocol.STATUS:
            self._send_client(identity, [protocol.STATUS, protocol.encode_json(self.status())])
        elif client is None:
            self.protocol_errors += 1
            self._send_client(identity, protocol.error(
                protocol.EXPIRED, f"{command[:32]!r} from a client this server does not know (it was dropped, "
                "or the server restarted); say HELLO again"))
        elif command == protocol.ACK:
            self._on_ack(client, *protocol.parse_ack(body))
        elif command == protocol.MODE:
            self._on_mode(client, *protocol.parse_mode(body))
        elif command == protocol.PING:
            client.last_seen = time.monotonic()
        elif command == protocol.BYE:  # a clean close: INFO; WARNING is for clients that vanish
            log.info("client %r (pid %s) left; %d slot(s) back", identity, client.local_pid,
                     len(client.leased) + len(client.ready))
            self._drop_client(client)
        else:
            raise ProtocolError(f"unknown command {command[:32]!r}")

    def _on_hello(self, identity: bytes, hello: protocol.HelloMsg) -> None:
        i, n = hello.shard
        if hello.index >= self.steps or hello.index % n != i:
            raise ProtocolError(f"HELLO: start index {hello.index} is not in shard ({i}, {n}) of an epoch "
                                f"of {self.steps} batches")
        if n > self.steps:
            raise ProtocolError(f"HELLO: {n} shards of an epoch of only {self.steps} batches")
        if self.failure is not None:
            self._send_client(identity, protocol.error("WorkerError", self.failure))
            return
        if identity in self.clients:
            self._drop_client(self.clients[identity])
        if len(self.clients) >= self.config.max_clients:
            self.peer_log.log(logging.WARNING, "refused a client: %d clients already (max_clients)",
                              len(self.clients))
            self._send_client(identity, protocol.error(
                "TooManyClients", f"the server already has {len(self.clients)} clients "
                f"(max_clients={self.config.max_clients}); try again later or raise max_clients"))
            return
        job = self.jobs.get(hello.job) if hello.job is not None else None
        if job is None or job.shard != hello.shard:
            job = Job(hello.job, 0, hello.shard, self.steps)
            job.start = hello.epoch * job.per_epoch + (hello.index - i) // n
            if hello.job is not None:
                self.jobs[hello.job] = job
        job.members += 1
        credit = min(hello.credit, self.max_credit)
        local_pid = hello.pid if hello.pid > 0 and hello.pidns and hello.pidns == self.pidns else None
        client = self.clients[identity] = ClientState(identity, job, credit, time.monotonic(), local_pid)
        self.metrics.client_joined(identity, credit)
        welcome = {**self.welcome, "credit": credit}
        if self.free_mailboxes:  # used only if the client maps the ring; MODE says
            client.mailbox_id, token = self.free_mailboxes.popleft(), secrets.randbits(63) + 1
            self.ring.mailboxes[client.mailbox_id].assign(token)  # before the client can look
            welcome["mailbox"] = [client.mailbox_id, token]
        self._send_client(identity, [protocol.WELCOME, protocol.encode_json(welcome)])

    def _on_mode(self, client: ClientState, mode: str, proof: bytes | None) -> None:
        # Descriptors are for clients that map the ring; only they can read its proof.
        if proof is not None and not hmac.compare_digest(proof, self.ring.proof):
            raise ProtocolError(f"MODE {mode}: the proof does not match this server's ring; a client "
                                "that does not map the ring must ask for frames")
        if mode == "mailbox":
            if client.mailbox_id is None:
                raise ProtocolError("MODE mailbox: WELCOME offered this client no mailbox")
            client.mailbox = self.ring.mailboxes[client.mailbox_id]
        else:
            self._return_mailbox(client)
        client.frames, client.started = mode == "frames", True
        client.last_seen = time.monotonic()

    def _return_mailbox(self, client: ClientState) -> None:
        if client.mailbox_id is not None:
            self.free_mailboxes.append(client.mailbox_id)
            client.mailbox_id = client.mailbox = None

    def _on_ack(self, client: ClientState, credit: int, releases: tuple[int, ...]) -> None:
        client.last_seen = time.monotonic()
        client.credit = min(client.credit + credit, self.max_credit)
        self.metrics.client_credit(client.identity, client.credit)
        for slot_id in releases:
            if slot_id not in client.leased:
                raise ProtocolError(f"ACK releases slot {slot_id}, which this client does not hold")
            client.leased.discard(slot_id)
            self.leased -= 1
            self._free(slot_id)

    def _drop_client(self, client: ClientState) -> None:
        del self.clients[client.identity]
        self.metrics.client_left(client.identity)
        self._return_mailbox(client)
        job = client.job
        job.members -= 1
        if job.members:
            job.retask.extend(sorted(client.assigned))  # another member gets them
        elif self.jobs.get(job.name) is job:  # a job by that name with other shards may have replaced it
            del self.jobs[job.name]
        self.leased -= len(client.leased)
        for slot_id in [*client.leased, *(v for v in client.ready.values() if isinstance(v, int))]:
            self._free(slot_id)
        self.retask = deque(t for t in self.retask if t.client != client.identity)
        self.deaths = {t: n for t, n in self.deaths.items() if t.client != client.identity}

    def _client_gone(self, client: ClientState, now: float) -> bool:
        """A local client is gone when its process is; a remote one when it stops pinging.
        A live local process may be silent for long (an import holding the GIL, say)."""
        silent = now - client.last_seen
        if client.local_pid is None:
            return silent > CLIENT_TIMEOUT_FACTOR * self.config.heartbeat_s
        if silent > LOCAL_CLIENT_SILENCE_S:
            return True
        if now - client.pid_checked_at < LOCAL_PID_CHECK_S:
            return False
        client.pid_checked_at = now
        return not pid_alive(client.local_pid)

    def _expire_clients(self) -> None:
        now = time.monotonic()
        for client in [c for c in self.clients.values() if self._client_gone(c, now)]:
            silent = now - client.last_seen
            self.peer_log.log(logging.WARNING, "client %r (pid %s) gone, silent for %.1f s; reclaiming its "
                              "%d slot(s)", client.identity, client.local_pid, silent,
                              len(client.leased) + len(client.ready))
            self._send_client(client.identity, protocol.error(
                protocol.EXPIRED, f"this client was silent for {silent:.1f} s and was dropped; say HELLO again"))
            self._drop_client(client)

    def _ping_clients(self) -> None:
        now = time.monotonic()
        if now - self.last_ping >= self.config.heartbeat_s / 2:
            self.last_ping = now
            for identity in self.clients:
                self._send_client(identity, [protocol.PING])

    def _warn_if_starved(self, now: float) -> None:
        """Clients' unread batches can hold every slot; a client that wants one then waits."""
        if self.leased < len(self.slots) or not any(c.hungry for c in self.clients.values()):
            self.last_starved_warning = now
        elif now - self.last_starved_warning > STARVED_WARNING_S:
            self.last_starved_warning = now
            held = sorted((len(c.leased) for c in self.clients.values()), reverse=True)
            log.warning("all %d slots are held by clients (slots per client: %s), so clients that want "
                        "a batch wait; start the service with more slots or open feeds with a smaller "
                        "prefetch", len(self.slots), held)

    def _send_client(self, identity: bytes, frames: list[bytes]) -> None:
        self.frontend.send_multipart([identity, *frames])

    # -- scheduling and delivery ------------------------------------------

    def _next_task(self) -> Retask | None:
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
        return Retask(client.identity, seq)

    def _remote_slots(self) -> int:
        """Slots held for clients that get frames: being made for them, or still being sent.
        A peer that stops reading its socket holds its frames' slots until it disconnects."""
        return len(self.in_transit) + sum(len(c.assigned) for c in self.clients.values() if c.frames)

    def _schedule(self) -> None:
        """Hand out tasks while there are free slots, idle workers and wanted batches;
        each worker gets its share in one TASK message."""
        batches: dict[int, list[TaskMsg]] = {}
        active = self._active_workers()
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
            self.slots[slot_id] = Slot(SlotState.FILLING, worker_id, task.client, client.job, task.seq,
                                       epoch, index)
            self.workers[worker_id].inflight.add(slot_id)
            self.progress.assigned(worker_id, time.monotonic())
            self.metrics.worker_assigned(worker_id)
            batches.setdefault(worker_id, []).append(TaskMsg(slot_id, epoch, index))
        for worker_id, tasks in batches.items():
            self._send_worker(worker_id, protocol.tasks(tasks))

    def _active_workers(self) -> list[tuple[int, WorkerState]]:
        """The ready workers that may get tasks: all of them, or with ``workers = "auto"`` the
        tuner's count of them, lowest ids first (the others stay warm, idle on their links)."""
        ready = [(wid, w) for wid, w in self.workers.items() if w.ready]
        return ready if self.auto is None else sorted(ready)[:self.auto.active]

    def _deliver_pending(self) -> None:
        """Deliver to every client that got batches in this pass: one message for all of them."""
        for identity in self.pending_delivery:
            if identity in self.clients:
                self._deliver(self.clients[identity])
        self.pending_delivery.clear()

    def _deliver(self, client: ClientState) -> None:
        headers = []
        while (seq := client.next_deliverable(self.config.ordered)) is not None:
            slot_id = client.delivered(seq)
            if not isinstance(slot_id, int):  # the batch failed: its error takes its place
                if client.mailbox is None:
                    self._send_headers(client, headers)
                    headers = []
                else:
                    epoch, index = client.job.position(seq)
                    headers.append(BatchMsg(0, protocol.FLAG_ERROR, epoch, index, seq))
                self._send_client(client.identity, slot_id)
                continue
            slot = self.slots[slot_id]
            slot.state = SlotState.LEASED
            header = BatchMsg(slot_id, 0, slot.epoch, slot.index, seq)
            if client.frames:
                self._send_slot(client.identity, header)
            else:
                client.leased.add(slot_id)
                self.leased += 1
                # Keep enough slots out of client hands for every worker to keep filling.
                if self.leased > len(self.slots) - len(self.workers):
                    header = BatchMsg(slot_id, protocol.FLAG_COPY, slot.epoch, slot.index, seq)
                headers.append(header)
            self.served += 1
            self.metrics.served(self.config.batch_size)
        self.metrics.client_credit(client.identity, client.credit)
        self._send_headers(client, headers)

    def _send_slot(self, identity: bytes, header: BatchMsg) -> None:
        """Send a slot's fields, in layout order, as frames that alias it. pyzmq's ``track=True``
        watches only the last frame, and frames under ``zmq.COPY_THRESHOLD`` are copied at once,
        so each frame is tracked: the slot is free only once libzmq is done with all of them."""
        arrays = [zmq.Frame(array, track=True) for array in self.ring.arrays[header.slot].values()]
        self.frontend.send_multipart([identity, *protocol.batch(header), *arrays], copy=False)
        self.in_transit.append((zmq.MessageTracker(*arrays), header.slot))

    def _send_headers(self, client: ClientState, headers: list[BatchMsg]) -> None:
        if not headers:
            return
        if client.mailbox is None:
            self._send_client(client.identity, protocol.batches(headers))
        elif client.mailbox.publish(headers, more_coming=bool(client.assigned)):
            self._send_client(client.identity, [protocol.WAKE])

    def _reap_transit(self) -> None:
        still = []
        for tracker, slot_id in self.in_transit:
            if tracker.done:
                self._free(slot_id)
            else:
                still.append((tracker, slot_id))
        freed = len(still) < len(self.in_transit)
        self.transit_poll_s = TRANSIT_POLL_S if freed else min(2 * self.transit_poll_s, TRANSIT_POLL_MAX_S)
        self.in_transit = still

    def _free(self, slot_id: int) -> None:
        self.slots[slot_id] = Slot()
        self.free.append(slot_id)

    # -- status ----------------------------------------------------------

    def status(self) -> dict:
        rates = self.metrics.snapshot()
        counts = {state.value: 0 for state in SlotState}
        for slot in self.slots:
            counts[slot.state.value] += 1
        return {
            "name": self.config.name,
            "endpoint": self.config.endpoint,
            "ready": self.is_ready and self.failure is None,
            "failure": self.failure,
            "workers": self.pool.alive(),
            "worker_pids": [proc.pid for proc in self.pool.procs.values()],
            "workers_ready": [self.pool.pid(wid) for wid, w in self.workers.items() if w.ready],
            "workers_configured": self.config.worker_processes,
            "workers_auto": self.auto is not None,
            "workers_active": len(self._active_workers()),
            "worker_restarts": self.pool.restarts_total,
            "slots": {"total": len(self.slots), **counts},
            "clients": len(self.clients),
            "jobs": sorted(self.jobs),
            "batches_served": self.served,
            "samples_skipped": self.skipped,
            "samples_per_s": round(rates.samples_per_s_window, 1),
            "batch_size": self.config.batch_size,
            "steps_per_epoch": self.steps,
            "protocol_errors": self.protocol_errors,
            "uptime_s": round(time.monotonic() - self.started, 1),
            **self._metrics_status(rates),
            **self.status_extra,
        }

    def _metrics_status(self, rates) -> dict:
        """Where the time goes (``metrics.py``), and what is being made."""
        per_worker = []
        for wid, worker in sorted(self.workers.items())[:STATUS_MAX_WORKERS]:
            figures = rates.workers.get(wid, IDLE_WORKER)
            per_worker.append({"worker": wid, "pid": self.pool.pid(wid), "ready": worker.ready,
                               "busy_share": round(figures.busy_share, 3),
                               "batch_s": None if figures.batch_s is None else round(figures.batch_s, 6)})
        return {
            "metrics_window_s": round(rates.window_s, 1),
            "samples_per_s_window": round(rates.samples_per_s_window, 1),
            "samples_per_s_since_start": round(rates.samples_per_s_since_start, 1),
            "samples_served": rates.samples_total,
            "ring_dry_share": None if rates.ring_dry_share is None else round(rates.ring_dry_share, 3),
            "per_worker": per_worker,
            "fields": [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype} for f in self.layout.fields],
            "pipeline": [spec["op"] for spec in self.config.augment],
            "data": self.config.data,
        }
