"""``Connection``: a feed's link to one ringfeed server, and nothing about batches.

It owns the DEALER socket and its monitor, says HELLO and waits for WELCOME,
sends (bounded, see ``send``), ACKs credit and released slots, PINGs, says BYE,
and runs the heartbeat thread. Messages that carry batches are handed on
(``receive``); the feed's arrival sources (``client/arrivals.py``) make them
into batches.

One lock, ``lock``, guards the socket and every piece of the feed's state that
messages change, because two threads use them: the caller's (``next_batch``,
the generator, tf.data) and the daemon heartbeat thread, which every
``heartbeat_s / 4`` runs the feed's ``beat``: read the monitor, take in what has
arrived, give back slots whose arrays died while the trainer was busy elsewhere
(e.g. in Keras validation), and ping. Every method here is called with the lock
held, except ``connect`` during the feed's ``__init__``, before the thread starts.

Liveness: the monitor reports when the connection drops (``disconnected_at``),
and the server says when it dropped this client (ERROR "Expired", after a
pause longer than its client timeout: ``expired``). A server that stays silent
for ``timeout_s``, or takes no message for as long, becomes the feed's
``failure``, a ``ServerGoneError``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol
from .errors import RemoteWorkerError, RingfeedError, ServerGoneError
from .paths import pid_namespace

POLL_S = 0.02
BYE_LINGER_MS = 200  # how long a closed socket may still spend sending its BYE
_MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class Message(NamedTuple):
    """A message from the server that carries batches: BATCH, BATCHES, or the ERROR of one
    failed batch (``error``: its details, parsed)."""

    command: bytes
    frames: list
    error: dict | None = None


class Connection:
    """The link to the server at ``endpoint`` for a feed that asks for ``prefetch`` batches of
    credit, of ``job`` and ``shard``. ``accept`` takes each checked WELCOME and returns the MODE
    message to answer it with; a ``RingfeedError`` it raises refuses the server."""

    def __init__(self, endpoint: str, *, timeout_s: float, prefetch: int, job: str | None,
                 shard: tuple[int, int], curve: dict, accept: Callable[[protocol.WelcomeMsg], list]):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._prefetch, self._job, self._shard, self._curve = prefetch, job, shard, curve
        self._accept = accept
        self.lock = threading.Lock()
        self.failure: Exception | None = None  # raised by every call of the feed from now on
        self.disconnected_at: float | None = None
        self.expired = False
        self.heartbeat_s = 0.0
        self.thread: threading.Thread | None = None
        self._sock = self._monitor = self._poller = None
        self._last_heard = self._last_ping = 0.0

    # -- HELLO and WELCOME ---------------------------------------------------

    def connect(self, start: tuple[int, int], deadline: float | None = None) -> None:
        """Open a fresh socket, say HELLO from ``start`` and wait (until ``deadline``, else for
        ``timeout_s``) for WELCOME. A failure closes both sockets and is raised."""
        self._open_socket()
        self.send(protocol.hello(start[0], start[1], self._prefetch, os.getpid(), pid_namespace(),
                                 self._job, self._shard))
        deadline = deadline or time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not self._poller.poll(POLL_S * 1000):
                continue
            self.read_monitor()
            if self.failure is not None:
                self._abandon(self.failure)
            if not self._sock.poll(0):
                continue
            frames = self._sock.recv_multipart()
            if frames[0] == protocol.WELCOME:
                self._welcomed(frames)
                return
            if frames[0] == protocol.ERROR:
                self._abandon(RingfeedError(protocol.parse_error(frames)["message"]))
        self._abandon(ServerGoneError(f"no ringfeed server answered at {self.endpoint} within "
                                      f"{self.timeout_s} s; is it running? (ringfeed status)"))

    def reconnect(self, start: tuple[int, int]) -> None:
        """The server went away: HELLO again from ``start`` on a fresh socket, until ``timeout_s``
        after it went."""
        deadline = max(self.disconnected_at + self.timeout_s, time.monotonic() + 2 * POLL_S)
        try:
            self.connect(start, deadline)
        except ServerGoneError:
            self.failure = ServerGoneError(f"the ringfeed server at {self.endpoint} went away and was not "
                                           f"back within timeout_s={self.timeout_s}")
            raise self.failure from None

    def _welcomed(self, frames: list) -> None:
        try:
            welcome = protocol.parse_welcome(frames, self._prefetch)
        except protocol.ProtocolError as exc:
            self._abandon(RingfeedError(f"refusing the server at {self.endpoint}: {exc}"))
        self.heartbeat_s = welcome.heartbeat_s
        try:
            mode = self._accept(welcome)
        except RingfeedError as exc:
            self._abandon(exc)
        self.send(mode)
        self._last_heard = self._last_ping = time.monotonic()
        self.disconnected_at, self.expired = None, False

    def _open_socket(self) -> None:
        # The socket first: closing it ends its monitor, whose events libzmq's I/O thread (shared
        # by every socket of the process) would otherwise wait to send to a monitor nobody reads.
        for old in (self._sock, self._monitor):
            if old is not None:
                old.close(0)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(min(self.timeout_s * 1000, 2**31 - 1)))  # see send
        for option, value in self._curve.items():
            sock.setsockopt(option, value)
        self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _abandon(self, failure: Exception) -> None:
        self.failure = failure
        self._sock.close(0)
        self._monitor.close(0)
        raise failure

    # -- what the server says ------------------------------------------------

    def receive(self) -> Iterator[Message]:
        """Each message waiting on the socket, read one at a time without waiting. Those about the
        link are dealt with here (PING, WAKE: nothing to do; ERROR "Expired": ``expired``; other
        ERRORs that name no batch and unknown commands: ``failure``); those that carry batches
        are yielded."""
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            command = frames[0].bytes
            if command in (protocol.BATCH, protocol.BATCHES):
                yield Message(command, frames)
            elif command == protocol.ERROR:
                details = protocol.parse_error(frames)
                if details["kind"] == protocol.EXPIRED:
                    self.expired = True
                    self.disconnected_at = self.disconnected_at or time.monotonic()
                elif details["kind"] == "ProtocolError":
                    self.failure = RingfeedError(f"server refused a message: {details['message']}")
                elif "index" in details:  # a failed batch
                    yield Message(command, frames, details)
                else:
                    self.failure = RemoteWorkerError(details)
            elif command not in (protocol.PING, protocol.WAKE):
                self.failure = RingfeedError(f"unexpected message {command[:32]!r} from the server")

    def heard(self) -> None:
        """The server showed it is alive other than by a message (a mailbox record)."""
        self._last_heard = time.monotonic()

    def wait(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for a message or a monitor event, and read the monitor."""
        if self._monitor in dict(self._poller.poll(wait_s * 1000)):
            self.read_monitor()

    def read_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.disconnected_at = self.disconnected_at or time.monotonic()
            else:
                self.failure = RingfeedError(f"the server at {self.endpoint} refused this client's "
                                             "CURVE handshake (wrong or missing key)")

    def check_alive(self) -> None:
        silent = time.monotonic() - self._last_heard
        if silent > self.timeout_s and self.failure is None and self.disconnected_at is None:
            self.failure = ServerGoneError(
                f"the ringfeed server at {self.endpoint} has been silent for {silent:.1f} s "
                f"(timeout_s={self.timeout_s}); it has stopped or hangs")

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- what this client says -----------------------------------------------

    def send(self, frames: list) -> None:
        """Send ``frames``, waiting at most ``timeout_s`` for room: a DEALER whose server takes
        nothing queues up to its high-water mark and would then block for ever."""
        try:
            self._sock.send_multipart(frames)
        except zmq.Again:
            self.failure = self.failure or ServerGoneError(
                f"the ringfeed server at {self.endpoint} took no message for {self.timeout_s} s "
                f"(timeout_s); it has stopped or hangs")
            raise self.failure from None

    def ack(self, credit: int, releases: list[int]) -> bool:
        """ACK ``credit`` more batches and the ``releases``d slots; False, sending nothing, while the
        link is down: those slots mean nothing to the next connection."""
        if self.disconnected_at is not None:
            return False
        self.send(protocol.ack(credit, releases))
        return True

    def keepalive(self, every_s: float) -> None:
        """PING the server unless this client pinged it less than ``every_s`` ago."""
        now = time.monotonic()
        if self.disconnected_at is None and now - self._last_ping >= every_s:
            self.send([protocol.PING])
            self._last_ping = now

    def bye(self) -> None:
        """Say BYE (the server logs a clean close, not a vanished client), if it can be sent."""
        try:
            self.send([protocol.BYE])
        except ServerGoneError:  # a server that takes nothing misses our goodbye, and nothing else
            pass

    def leave(self) -> None:
        """BYE unless the server is gone, then close the socket (giving the BYE ``BYE_LINGER_MS``)
        and, after it, its monitor."""
        if self.disconnected_at is None and not isinstance(self.failure, ServerGoneError):
            self.bye()
        self._sock.close(linger=BYE_LINGER_MS)
        self._monitor.close(0)

    # -- the heartbeat thread ------------------------------------------------

    def start_heartbeat(self, beat: Callable[[], bool]) -> None:
        """Run ``beat`` (one heartbeat of the feed, under the lock: whether the feed has left)
        every ``heartbeat_s / 4`` until it returns True or the socket is closed."""
        self.thread = threading.Thread(target=self._heartbeat_loop, args=(beat,), name="ringfeed-heartbeat",
                                       daemon=True)
        self.thread.start()

    def _heartbeat_loop(self, beat: Callable[[], bool]) -> None:
        while True:
            time.sleep(self.heartbeat_s / 4)
            with self.lock:
                if self._sock.closed:
                    return
                try:
                    if beat():
                        return
                except Exception as exc:
                    # Whatever goes wrong in a beat (a bad message, a server that takes nothing)
                    # becomes the feed's failure, and the thread goes on: it is what reads the
                    # socket's monitor, and libzmq's I/O thread, shared by every socket of the
                    # process, waits while a monitor's queue is full.
                    if self.failure is None:
                        self.failure = exc if isinstance(exc, (RingfeedError, protocol.ProtocolError)) else \
                            RingfeedError(f"the server at {self.endpoint}: {type(exc).__name__}: {exc}")
