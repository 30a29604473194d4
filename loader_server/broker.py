"""The broker: one ZeroMQ poll loop around the scheduler (``scheduler.py``).

Clients talk to the frontend ROUTER (``sessions.py`` handles their messages
and encodes what they are sent); each worker has a socketpair of its own
(``channel.py``), polled next to the worker's process sentinel. Each pass of
the loop turns what arrived into scheduler events, then asks the scheduler for
deliveries (READY slots in batch order, or as they finish when ``ordered`` is
off) and tasks (warm workers with spare capacity get them while there are
FREE slots and started clients with unused credit), and sends them.

A dead worker is replaced and the scheduler recomputes its batches. A worker
that makes no progress past its deadline (``deadlines.py``) is killed and
counts as dead. A replacement that cannot be started (out of file
descriptors, say) is retried every ``RESTART_RETRY_S``. Once no worker is
left, the service has failed: every client, new ones included, is told why,
``status`` says so, and the loop ends after ``FAILED_LINGER_S``.

A client that is gone (its process, over ipc; ``1.5 * heartbeat_s`` of
silence otherwise) loses its slots, batches it never received return to its
job, and it is told (ERROR "Expired"), so a live one says HELLO again.
"""

from __future__ import annotations

import logging
import time

import zmq

from ringfeed import protocol
from ringfeed.protocol import ProtocolError

from . import worker_protocol
from .autotune import AutoWorkers
from .channel import ChannelError
from .config import AUTO_WORKERS, Config
from .cursors import Failure
from .deadlines import ProgressClock
from .metrics import IDLE_WORKER, Metrics
from .pool import RestartLimitError, WorkerPool
from .ring import Ring
from .scheduler import Scheduler
from .sessions import Sessions

log = logging.getLogger("ringfeed.broker")

TICK_S = 0.1
RESTART_RETRY_S = 1.0
FAILED_LINGER_S = 10.0  # a failed service answers clients and status this long, then exits
STATUS_MAX_WORKERS = 256  # per-worker figures in a status reply: it must fit protocol.MAX_JSON_BYTES


class Broker:
    def __init__(self, config: Config, ring: Ring, pool: WorkerPool, frontend: zmq.Socket,
                 welcome: dict, on_ready, housekeeping=(), watched=None):
        """``housekeeping``: callables run every ``TICK_S``; ``watched``: {socket: handler} of
        other sockets to poll, each handler called when its socket is readable."""
        self.config, self.ring, self.layout, self.pool = config, ring, ring.layout, pool
        self.frontend = frontend
        self.housekeeping = tuple(housekeeping)
        self.watched = dict(watched or {})
        self.steps = welcome["steps_per_epoch"]
        self.on_ready = on_ready
        self.is_ready = False
        self.scheduler = Scheduler(self.layout.slots, pool.procs, self.steps, config.ordered)
        self.sessions = Sessions(self, welcome)
        self.protocol_errors = 0
        self.started = time.monotonic()
        self.metrics = Metrics(time.monotonic)
        self.status_extra: dict = {}  # more status keys, set by the service (the metrics URL)
        self.progress = ProgressClock(config.task_timeout_s)
        # workers = "auto": tasks go only to as many of the lowest ids as the tuner says
        self.auto = AutoWorkers(len(pool.procs), time.monotonic()) if config.workers == AUTO_WORKERS else None
        self.unstarted: set[int] = set()  # workers whose replacement could not be started yet
        self.next_restart_retry = 0.0
        self.rebuild_poller = False
        self.failure: str | None = None  # why the service cannot serve (no workers left)
        self.failed_at = 0.0

    # -- main loop -------------------------------------------------------

    def run(self, should_stop) -> None:
        poller, sentinels, links = self._poller()
        next_housekeeping = 0.0
        sessions = self.sessions
        while not should_stop() and not self._failed_long_enough():
            # Trackers have no fd: while batches are on the wire, look at them often.
            events = dict(poller.poll(sessions.transit_poll_s * 1000 if sessions.in_transit else TICK_S * 1000))
            for fd, wid in list(links.items()):
                if fd in events and not self._drain_worker(wid):
                    poller.unregister(fd)  # at its end for good; the worker's sentinel reports its exit
                    del links[fd]
            sessions.deliver(self.scheduler.deliver())
            for sock, handler in self.watched.items():
                if sock in events:
                    handler()
            if self.frontend in events:
                self._drain(self.frontend, sessions.on_message)
            exited = [wid for fd, wid in sentinels.items() if fd in events]
            for wid in exited:
                self._on_worker_exit(wid)
            if exited or self.rebuild_poller:
                poller, sentinels, links = self._poller()
                self.rebuild_poller = False
                sessions.deliver(self.scheduler.deliver())
            if sessions.in_transit:
                sessions.reap_transit()
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + TICK_S
                self._housekeeping(now)
            self._schedule()

    def _housekeeping(self, now: float) -> None:
        self.sessions.expire()
        self.sessions.ping()
        self.sessions.warn_if_starved(now)
        self._kill_hung_workers(now)
        self._retry_starts(now)
        if self.auto is not None:
            self.auto.tick(now, self.scheduler.served, len(self.scheduler.free), self.metrics.take_interval())
        for task in self.housekeeping:
            task()

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
            self._send_worker(worker_id, [worker_protocol.STOP])

    def _send_worker(self, worker_id: int, frames: list[bytes]) -> None:
        try:
            self.pool.channels[worker_id].send(frames)
        except ChannelError as exc:
            self._kill_worker(worker_id, exc)

    def _kill_worker(self, worker_id: int, reason) -> None:
        """A worker whose link failed gets no more tasks and is killed; its sentinel then
        reports the death, and its batches are recomputed."""
        log.warning("worker %d: %s; killing it", worker_id, reason)
        self.scheduler.worker_unready(worker_id)
        self.pool.kill(worker_id)

    def _drain(self, sock: zmq.Socket, handler) -> None:
        for _ in range(1000):  # bounded, so one busy side cannot starve the other
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def send_client(self, identity: bytes, frames: list[bytes]) -> None:
        self.frontend.send_multipart([identity, *frames])

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
            if command == worker_protocol.W_HELLO:
                self._on_worker_hello(worker_id, *worker_protocol.parse_worker_hello(frames))
            elif command == worker_protocol.W_DONE:
                done = worker_protocol.parse_worker_done(frames)
                for slot_id, skipped in done:
                    self.scheduler.done(worker_id, slot_id, skipped)
                self._progressed(worker_id, len(done))
            elif command == worker_protocol.W_ERROR:
                slot_id, details = worker_protocol.parse_worker_error(frames)
                self.scheduler.error(worker_id, slot_id, _failure(details))
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
        busy = self.scheduler.busy(worker_id)
        self.progress.progressed(worker_id, batches, time.monotonic(), busy)
        self.metrics.worker_progressed(worker_id, batches, busy)

    def _on_worker_hello(self, worker_id: int, claimed_id: int, pid: int) -> None:
        if claimed_id != worker_id or self.pool.pid(worker_id) != pid:
            raise ProtocolError(f"W_HELLO on worker {worker_id}'s link claims worker {claimed_id} (pid {pid})")
        all_ready = self.scheduler.worker_ready(worker_id)
        if not self.is_ready and all_ready:
            self.is_ready = True
            self.metrics = Metrics(time.monotonic)  # rates since start count from when clients can come
            self.on_ready()

    def _on_worker_exit(self, worker_id: int) -> None:
        self.scheduler.worker_exit(worker_id)
        self.progress.forget(worker_id)
        self.metrics.worker_gone(worker_id)
        try:
            code = self.pool.replace_dead(worker_id)
        except RestartLimitError as exc:
            left = self.scheduler.retire_worker(worker_id)
            log.error("not replacing worker %d: %s", worker_id, exc)
            if not left:
                self._fail(f"no workers left: {exc}")
            return
        except OSError as exc:  # EMFILE, ENOMEM: the restart is counted; its start is retried
            self._cannot_start(worker_id, exc)
            return
        self.scheduler.fail_poison_batches(code)

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
                self.sessions.peer_log.log(logging.ERROR, "worker %d still cannot be started: %s", worker_id, exc)
                continue
            self.unstarted.discard(worker_id)
            self.rebuild_poller = True
            log.info("started the replacement for worker %d", worker_id)

    def _kill_hung_workers(self, now: float) -> None:
        for worker_id, stalled_s in self.progress.overdue(now):
            self.progress.forget(worker_id)  # killed once; its sentinel reports the death
            tasks = len(self.scheduler.workers[worker_id].inflight)
            self._kill_worker(worker_id, f"no progress for {stalled_s:.1f} s on {tasks} task(s), past its "
                                         f"deadline of {self.progress.deadline_s:.1f} s (task_timeout_s, or "
                                         "10x the recent time per batch)")

    def _fail(self, reason: str) -> None:
        """No workers are left: tell every client, and refuse new ones, with ``reason``."""
        self.failure, self.failed_at = reason, time.monotonic()
        log.error("the service has failed: %s; exiting in %.0f s", reason, FAILED_LINGER_S)
        for identity in list(self.sessions.clients):
            self.send_client(identity, protocol.error("WorkerError", reason))
            self.sessions.drop(identity)

    # -- tasks -----------------------------------------------------------

    def active_limit(self) -> int | None:
        """How many of the ready workers get tasks: all (None), or the tuner's count."""
        return None if self.auto is None else self.auto.active

    def _schedule(self) -> None:
        for effect in self.scheduler.schedule(self.active_limit()):
            self.progress.assigned(effect.worker, time.monotonic())
            self.metrics.worker_assigned(effect.worker)
            self._send_worker(effect.worker, worker_protocol.tasks(list(effect.tasks)))

    # -- status ----------------------------------------------------------

    def status(self) -> dict:
        rates = self.metrics.snapshot()
        scheduler = self.scheduler
        return {
            "name": self.config.name,
            "endpoint": self.config.endpoint,
            "ready": self.is_ready and self.failure is None,
            "failure": self.failure,
            "workers": self.pool.alive(),
            "worker_pids": [proc.pid for proc in self.pool.procs.values()],
            "workers_ready": [self.pool.pid(wid) for wid, w in scheduler.workers.items() if w.ready],
            "workers_configured": self.config.worker_processes,
            "workers_auto": self.auto is not None,
            "workers_active": len(scheduler.active_workers(self.active_limit())),
            "worker_restarts": self.pool.restarts_total,
            "slots": {"total": len(scheduler.slots), **scheduler.slot_counts()},
            "clients": len(scheduler.clients),
            "jobs": sorted(scheduler.jobs),
            "batches_served": scheduler.served,
            "samples_skipped": scheduler.skipped,
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
        for wid, worker in sorted(self.scheduler.workers.items())[:STATUS_MAX_WORKERS]:
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


def _failure(details: dict) -> Failure:
    """A worker's W_ERROR body (kind and message checked by ``worker_protocol.parse_worker_error``)."""
    return Failure(details["kind"], details["message"], traceback=details.get("traceback"),
                   sample=details.get("sample"), position=details.get("position"),
                   worker_pid=details.get("worker_pid"))

