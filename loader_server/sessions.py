"""The broker's clients: their messages, liveness, mailboxes, and how batches reach them.

``Sessions`` parses what a client sends and turns it into scheduler events
(``scheduler.py`` keeps each client's cursor, credit and leases); what it
keeps itself is what needs the outside world: when the client was last heard,
its pid (a local client is gone when its process is), and the shared-memory
mailbox it was offered. A message that raises anything while it is handled
costs that client its session, never the loop.

It also turns the scheduler's ``Deliver`` effects into frames: slot
descriptors written to the client's mailbox (a WAKE message only when the
client sleeps) or sent in a BATCHES message; for clients on other hosts, the
slot's bytes as ``copy=False`` frames, whose slot is free once ZeroMQ's
tracker says the bytes are gone; a failed batch as an ERROR message at its
place in the stream.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

import zmq

from ringfeed import protocol
from ringfeed.paths import pid_namespace
from ringfeed.protocol import BatchMsg, ProtocolError

from .procs import pid_alive
from .cursors import Delivery
from .ratelimit import LogLimiter
from .scheduler import Deliver

log = logging.getLogger("ringfeed.broker")

CLIENT_TIMEOUT_FACTOR = 1.5
LOCAL_CLIENT_SILENCE_S = 60.0
STARVED_WARNING_S = 10.0
LOCAL_PID_CHECK_S = 1.0  # how often a local client's pid is looked up in /proc
PEER_LOG_EVERY_S = 5.0  # log lines a peer can cause, at most one per this interval
TRANSIT_POLL_S = 0.0005  # the first look at frames on the wire; each look that frees nothing waits twice as long,
TRANSIT_POLL_MAX_S = 0.008  # up to this: a large batch takes milliseconds to send, and each wake costs CPU


@dataclass
class Session:
    last_seen: float
    local_pid: int | None  # set when the client shares our pid namespace over ipc
    pid_checked_at: float = 0.0
    mailbox_id: int | None = None  # offered in WELCOME
    mailbox: object = None  # ringfeed.mailbox.Mailbox, once MODE chose it


class Sessions:
    def __init__(self, broker, welcome: dict):
        """``broker``: sends frames, answers STATUS, and holds the scheduler and metrics."""
        self.broker = broker
        self.config = broker.config
        self.scheduler = broker.scheduler
        self.welcome = welcome
        self.clients: dict[bytes, Session] = {}  # the scheduler's clients, by the same identities
        self.free_mailboxes = deque(range(len(broker.ring.mailboxes)))
        self.in_transit: list = []  # (zmq MessageTracker, slot) of batches sent as frames
        self.transit_poll_s = TRANSIT_POLL_S
        self.last_ping = 0.0
        self.last_starved_warning = time.monotonic()
        self.peer_log = LogLimiter(log, PEER_LOG_EVERY_S)
        # Client pids are trusted for liveness only over ipc, where only our own user can connect.
        self.pidns = pid_namespace() if self.config.endpoint.startswith("ipc://") else None

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        self.broker.send_client(identity, frames)

    def on_message(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        command = body[0] if body else b""
        try:
            self._handle(identity, command, body)
        except ProtocolError as exc:
            self.broker.protocol_errors += 1
            self._send(identity, protocol.error("ProtocolError", str(exc)))
        except Exception as exc:  # a bug met on this message: it costs this client its session only
            self.broker.protocol_errors += 1
            log.exception("handling %r from client %r failed; dropping the client", command[:32], identity)
            if identity in self.clients:
                self.drop(identity)
            self._send(identity, protocol.error("ServerError", f"the server could not handle {command[:32]!r}: "
                                                f"{type(exc).__name__}: {exc}"))

    def _handle(self, identity: bytes, command: bytes, body: list[bytes]) -> None:
        session = self.clients.get(identity)
        if command == protocol.HELLO:
            self._on_hello(identity, protocol.parse_hello(body))
        elif command == protocol.STATUS:
            self._send(identity, [protocol.STATUS, protocol.encode_json(self.broker.status())])
        elif session is None:
            self.broker.protocol_errors += 1
            self._send(identity, protocol.error(
                protocol.EXPIRED, f"{command[:32]!r} from a client this server does not know (it was dropped, "
                "or the server restarted); say HELLO again"))
        elif command == protocol.ACK:
            session.last_seen = time.monotonic()
            self.scheduler.ack(identity, *protocol.parse_ack(body))
            self.broker.metrics.client_credit(identity, self.scheduler.clients[identity].credit)
        elif command == protocol.MODE:
            self._on_mode(identity, session, *protocol.parse_mode(body))
        elif command == protocol.PING:
            session.last_seen = time.monotonic()
        elif command == protocol.BYE:  # a clean close: INFO; WARNING is for clients that vanish
            log.info("client %r (pid %s) left; %d slot(s) back", identity, session.local_pid,
                     self.scheduler.clients[identity].held)
            self.drop(identity)
        else:
            raise ProtocolError(f"unknown command {command[:32]!r}")

    def _on_hello(self, identity: bytes, hello: protocol.HelloMsg) -> None:
        self.scheduler.check_start(hello.shard, hello.index)
        if self.broker.failure is not None:
            self._send(identity, protocol.error("WorkerError", self.broker.failure))
            return
        if identity in self.clients:
            self.drop(identity)
        if len(self.clients) >= self.config.max_clients:
            self.peer_log.log(logging.WARNING, "refused a client: %d clients already (max_clients)",
                              len(self.clients))
            self._send(identity, protocol.error(
                "TooManyClients", f"the server already has {len(self.clients)} clients "
                f"(max_clients={self.config.max_clients}); try again later or raise max_clients"))
            return
        cursor = self.scheduler.join(identity, hello.job, hello.shard, hello.epoch, hello.index, hello.credit)
        local_pid = hello.pid if hello.pid > 0 and hello.pidns and hello.pidns == self.pidns else None
        session = self.clients[identity] = Session(time.monotonic(), local_pid)
        self.broker.metrics.client_joined(identity, cursor.credit)
        welcome = {**self.welcome, "credit": cursor.credit}
        if self.free_mailboxes:  # used only if the client maps the ring; MODE says
            session.mailbox_id, token = self.free_mailboxes.popleft(), secrets.randbits(63) + 1
            self.broker.ring.mailboxes[session.mailbox_id].assign(token)  # before the client can look
            welcome["mailbox"] = [session.mailbox_id, token]
        self._send(identity, [protocol.WELCOME, protocol.encode_json(welcome)])

    def _on_mode(self, identity: bytes, session: Session, mode: str, proof: bytes | None) -> None:
        # Descriptors are for clients that map the ring; only they can read its proof.
        if proof is not None and not hmac.compare_digest(proof, self.broker.ring.proof):
            raise ProtocolError(f"MODE {mode}: the proof does not match this server's ring; a client "
                                "that does not map the ring must ask for frames")
        if mode == "mailbox":
            if session.mailbox_id is None:
                raise ProtocolError("MODE mailbox: WELCOME offered this client no mailbox")
            session.mailbox = self.broker.ring.mailboxes[session.mailbox_id]
        else:
            self._return_mailbox(session)
        self.scheduler.start(identity, frames=mode == "frames")
        session.last_seen = time.monotonic()

    def _return_mailbox(self, session: Session) -> None:
        if session.mailbox_id is not None:
            self.free_mailboxes.append(session.mailbox_id)
            session.mailbox_id = session.mailbox = None

    def drop(self, identity: bytes) -> None:
        """Forget the client: the scheduler takes its slots back and gives its batches to others."""
        session = self.clients.pop(identity)
        self.broker.metrics.client_left(identity)
        self._return_mailbox(session)
        self.scheduler.drop(identity)

    def deliver(self, effects: list[Deliver]) -> None:
        """One message per client for all its batches; a failure is an ERROR in its place."""
        for effect in effects:
            mailbox = self.clients[effect.client].mailbox
            headers = []
            for item in effect.items:
                if item.failure is not None:
                    if mailbox is None:
                        self._send_headers(effect, mailbox, headers)
                        headers = []
                    else:
                        headers.append(BatchMsg(0, protocol.FLAG_ERROR, item.epoch, item.index, item.seq))
                    self._send(effect.client, _error_frames(item))
                    continue
                header = BatchMsg(item.slot, protocol.FLAG_COPY if item.copy else 0, item.epoch, item.index,
                                  item.seq)
                if effect.frames:
                    self._send_slot(effect.client, header)
                else:
                    headers.append(header)
                self.broker.metrics.served(self.config.batch_size)
            self.broker.metrics.client_credit(effect.client, effect.credit)
            self._send_headers(effect, mailbox, headers)

    def _send_slot(self, identity: bytes, header: BatchMsg) -> None:
        """Send a slot's fields, in layout order, as frames that alias it. pyzmq's ``track=True``
        watches only the last frame, and frames under ``zmq.COPY_THRESHOLD`` are copied at once,
        so each frame is tracked: the slot is free only once libzmq is done with all of them."""
        arrays = [zmq.Frame(array, track=True) for array in self.broker.ring.arrays[header.slot].values()]
        self.broker.frontend.send_multipart([identity, *protocol.batch(header), *arrays], copy=False)
        self.in_transit.append((zmq.MessageTracker(*arrays), header.slot))

    def _send_headers(self, effect: Deliver, mailbox, headers: list[BatchMsg]) -> None:
        if not headers:
            return
        if mailbox is None:
            self._send(effect.client, protocol.batches(headers))
        elif mailbox.publish(headers, more_coming=effect.more_coming):
            self._send(effect.client, [protocol.WAKE])

    def reap_transit(self) -> None:
        still = []
        for tracker, slot_id in self.in_transit:
            if tracker.done:
                self.scheduler.sent(slot_id)
            else:
                still.append((tracker, slot_id))
        freed = len(still) < len(self.in_transit)
        self.transit_poll_s = TRANSIT_POLL_S if freed else min(2 * self.transit_poll_s, TRANSIT_POLL_MAX_S)
        self.in_transit = still

    def _gone(self, session: Session, now: float) -> bool:
        """A local client is gone when its process is; a remote one when it stops pinging.
        A live local process may be silent for long (an import holding the GIL, say)."""
        silent = now - session.last_seen
        if session.local_pid is None:
            return silent > CLIENT_TIMEOUT_FACTOR * self.config.heartbeat_s
        if silent > LOCAL_CLIENT_SILENCE_S:
            return True
        if now - session.pid_checked_at < LOCAL_PID_CHECK_S:
            return False
        session.pid_checked_at = now
        return not pid_alive(session.local_pid)

    def expire(self) -> None:
        now = time.monotonic()
        for identity in [i for i, s in self.clients.items() if self._gone(s, now)]:
            session = self.clients[identity]
            silent = now - session.last_seen
            self.peer_log.log(logging.WARNING, "client %r (pid %s) gone, silent for %.1f s; reclaiming its "
                              "%d slot(s)", identity, session.local_pid, silent,
                              self.scheduler.clients[identity].held)
            self._send(identity, protocol.error(
                protocol.EXPIRED, f"this client was silent for {silent:.1f} s and was dropped; say HELLO again"))
            self.drop(identity)

    def ping(self) -> None:
        now = time.monotonic()
        if now - self.last_ping >= self.config.heartbeat_s / 2:
            self.last_ping = now
            for identity in self.clients:
                self._send(identity, [protocol.PING])

    def warn_if_starved(self, now: float) -> None:
        """Clients' unread batches can hold every slot; a client that wants one then waits."""
        if not self.scheduler.starved():
            self.last_starved_warning = now
        elif now - self.last_starved_warning > STARVED_WARNING_S:
            self.last_starved_warning = now
            held = sorted((len(c.leased) for c in self.scheduler.clients.values()), reverse=True)
            log.warning("all %d slots are held by clients (slots per client: %s), so clients that want "
                        "a batch wait; start the service with more slots or open feeds with a smaller "
                        "prefetch", len(self.scheduler.slots), held)


def _error_frames(item: Delivery) -> list[bytes]:
    failure = item.failure
    return protocol.error(failure.kind, failure.message, traceback=failure.traceback, epoch=item.epoch,
                          index=item.index, sample=failure.sample, position=failure.position,
                          worker_pid=failure.worker_pid)
