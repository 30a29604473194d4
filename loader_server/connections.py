"""Bound the connections the frontend holds, and the bytes each TCP connection sends it.

libzmq has no per-socket connection cap: its I/O thread accepts every
connection that reaches the listener and keeps an fd open for each. Enough idle
peers exhaust the process's fd limit, and the next ``open`` anywhere in the
server (a worker restart's pipes) then fails with EMFILE.

``ConnectionGuard`` watches the frontend through a socket monitor and keeps the
set of open connection fds. A connection that would take the count past
``max_connections`` is ended without touching libzmq's ownership of its fd: the
guard shuts down a dup of it (``shutdown`` acts on the connection, not on the
descriptor), libzmq sees the peer gone and closes its own fd. libzmq never drops a
monitor event (its I/O thread waits while the monitor queue is full), so the set
stays exact as long as the broker keeps draining it. Over ipc or TCP
alike, a peer that keeps reconnecting gets accepted and dropped again; the
listen backlog and the refusal log bound what that costs.

libzmq bounds each frame (``ZMQ_MAXMSGSIZE``) but not the number of frames of a
multipart message that never ends: it holds them all (a 1-byte frame costs a
64-byte ``msg_t``) until the message completes or the connection goes, when
``pipe_t::rollback`` frees them. A ringfeed client sends the server little (a
HELLO once, then ACKs and PINGs: tens of KB/s at the most), so the guard gives
each TCP connection a byte budget, a token bucket of ``max_inbound_bytes_per_s``
refilled per second and holding at most ``INBOUND_BURST_BYTES`` (a HELLO at its
largest, twice over). From housekeeping it reads every TCP connection's
``tcpi_bytes_received`` (the kernel's count of payload bytes received, through a
dup of the fd) and ends the connections that overdrew their bucket, as above.

What that does not bound:

- Between two checks a peer sends at whatever rate libzmq ingests: the memory it
  can make the server hold is that rate times the time to the next check (a
  housekeeping tick, 0.1 s, or longer when the check is costly; see
  ``INBOUND_CHECK_SHARE``), at 21x its wire bytes for 1-byte frames.
- A peer that stays under the budget is never ended, so its unfinished message
  grows at up to the budget (21x that in memory) for as long as it stays connected.
- The budget is per connection: ``max_connections`` connections multiply both.
- ipc connections are not checked: only the owner of the socket file can connect.

Raising ``RLIMIT_NOFILE``'s soft limit to the hard limit at start, and a
default cap well below it, leave room for everything else the server opens.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from ringfeed.protocol import MAX_JSON_BYTES

from .ratelimit import LogLimiter

log = logging.getLogger("ringfeed.connections")

DEFAULT_MAX_CONNECTIONS = 4096
FD_LIMIT_SHARE = 4  # the default cap is at most a quarter of the fd limit
MAX_EVENTS_PER_CALL = 4096  # one call never holds the broker loop for long
REFUSAL_LOG_EVERY_S = 10.0
_OPENED = zmq.EVENT_ACCEPTED
_ENDED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
INBOUND_BURST_BYTES = 2 * MAX_JSON_BYTES  # a HELLO at its largest, with its handshake, twice over
INBOUND_CHECK_SHARE = 20  # the inbound check waits 20x its own duration: <= 5% of the broker's time
# struct tcp_info (linux/tcp.h): tcpi_bytes_received is the u64 after 8 u8, 24 u32 and the
# u64s tcpi_pacing_rate, tcpi_max_pacing_rate and tcpi_bytes_acked (Linux >= 4.1).
_TCP_INFO_BYTES = 232  # the header's full struct as of Linux 5.x; newer kernels' longer one is cut here
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_OFFSET = 128


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def default_max_connections(fd_limit: int) -> int:
    return max(1, min(DEFAULT_MAX_CONNECTIONS, fd_limit // FD_LIMIT_SHARE))


def _listener_address(endpoint: str) -> tuple[int, object]:
    """(family, local address key) of a connection accepted on ``endpoint`` ("tcp://host:port",
    "ipc://path"): the port for TCP, the socket path for ipc."""
    scheme, _, address = endpoint.partition("://")
    if scheme == "tcp":
        host, _, port = address.rpartition(":")
        return (socket.AF_INET6 if host.startswith("[") else socket.AF_INET), int(port)
    if scheme == "ipc":
        return socket.AF_UNIX, ("\0" + address[1:] if address.startswith("@") else address)
    raise ValueError(f"endpoint must be tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")


def _local_address(sock: socket.socket) -> tuple[int, object]:
    name = sock.getsockname()
    if sock.family in _TCP_FAMILIES:
        return sock.family, name[1]
    return sock.family, name.decode("latin-1") if isinstance(name, bytes) else name


def _is_connection_on(sock: socket.socket, endpoint: str) -> bool:
    """Whether ``sock`` is a connected stream socket accepted on ``endpoint`` (not the listener,
    not some other fd that reused the number)."""
    if sock.type != socket.SOCK_STREAM or _local_address(sock) != _listener_address(endpoint):
        return False
    try:
        sock.getpeername()  # the listener shares the local address but has no peer
    except OSError:
        return False
    return True


def end_connection(fd: int, endpoint: str) -> bool:
    """Shut down the connection on libzmq's ``fd`` through a dup, if it still is one accepted on
    ``endpoint``; libzmq keeps and closes its own fd. Returns whether it was shut down."""
    try:
        dup = os.dup(fd)
    except OSError:  # already closed by libzmq
        return False
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # not a socket: the number was reused
        os.close(dup)
        return False
    with sock:
        if not _is_connection_on(sock, endpoint):
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:  # the peer went first
            log.debug("shutdown of connection fd %d on %s: %s", fd, endpoint, exc)
            return False
    return True


class TcpInfoTooShort(RuntimeError):
    """The kernel's tcp_info ends before tcpi_bytes_received (Linux < 4.1)."""


def bytes_received(fd: int) -> int | None:
    """``tcpi_bytes_received`` of the TCP socket on libzmq's ``fd``, read through a dup; None if
    ``fd`` is no longer a TCP socket (closed, or its number reused)."""
    try:
        dup = os.dup(fd)
    except OSError:  # already closed by libzmq
        return None
    # The family only names the object: getsockopt acts on the fd whatever it is.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=dup) as sock:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except OSError:  # not a TCP socket: the number was reused
            return None
    if len(info) < _BYTES_RECEIVED_OFFSET + _BYTES_RECEIVED.size:
        raise TcpInfoTooShort(f"the kernel's tcp_info has {len(info)} bytes; tcpi_bytes_received needs "
                              f"{_BYTES_RECEIVED_OFFSET + _BYTES_RECEIVED.size} (Linux >= 4.1)")
    return _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_OFFSET)[0]


@dataclass(slots=True)
class _Inbound:
    """A TCP connection's byte budget: what it had sent at the last check, and what it may still send."""
    endpoint: str
    received: int = 0  # counted from the connection's start, so bytes sent before the accept count
    tokens: float = INBOUND_BURST_BYTES


class ConnectionGuard:
    """Counts the frontend's connections and ends those past ``max_connections``, and the TCP
    connections that send more than ``max_inbound_bytes_per_s`` (ipc ones are not checked: only
    the owner of the socket file can connect there).

    ``handle`` is the monitor's readable-handler (the broker's ``watched``); ``report_refusals``
    and ``check_inbound`` run as broker housekeeping.
    """

    def __init__(self, frontend: zmq.Socket, max_connections: int, max_inbound_bytes_per_s: int):
        for option, value in (("max_connections", max_connections),
                              ("max_inbound_bytes_per_s", max_inbound_bytes_per_s)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        self.max_connections = max_connections
        self.max_inbound_bytes_per_s = max_inbound_bytes_per_s
        self._frontend = frontend
        self.monitor = frontend.get_monitor_socket(_OPENED | _ENDED)
        self._open: set[int] = set()
        self._doomed: dict[int, str] = {}  # fd -> listener endpoint, past the cap, not yet ended
        self.refused = 0
        self._unreported = 0
        self._last_report = float("-inf")
        self._inbound: dict[int, _Inbound] | None = {}  # TCP fd -> its budget; None: not checked
        self._last_inbound_check = time.monotonic()
        self._next_inbound_check = self._last_inbound_check
        self.overdrawn = 0
        self._overdrawn_log = LogLimiter(log, REFUSAL_LOG_EVERY_S)

    @property
    def open(self) -> int:
        return len(self._open)

    def counters(self) -> dict:
        return {"open": self.open, "refused": self.refused, "max": self.max_connections,
                "overdrawn": self.overdrawn}

    def handle(self) -> None:
        """Apply the queued monitor events in order, then end the connections past the cap.
        Acting only once the queue is empty means an fd whose end is already queued is left alone."""
        if self._apply_events():
            self._end_doomed()

    def _apply_events(self) -> bool:
        """Apply up to ``MAX_EVENTS_PER_CALL`` events; return whether the queue is now empty."""
        for _ in range(MAX_EVENTS_PER_CALL):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return True
            fd, endpoint = int(event["value"]), event["endpoint"].decode("utf-8", "replace")
            if event["event"] & _OPENED:
                self._on_accepted(fd, endpoint)
            elif event["event"] & _ENDED:
                self._open.discard(fd)
                self._doomed.pop(fd, None)
                if self._inbound is not None:
                    self._inbound.pop(fd, None)
        return False

    def _on_accepted(self, fd: int, endpoint: str) -> None:
        if len(self._open) >= self.max_connections:
            self._doomed[fd] = endpoint
            return
        self._open.add(fd)
        if self._inbound is not None and endpoint.startswith("tcp://"):
            self._inbound[fd] = _Inbound(endpoint)

    def _end_doomed(self) -> None:
        doomed, self._doomed = self._doomed, {}
        for fd, endpoint in doomed.items():
            if end_connection(fd, endpoint):
                self.refused += 1
                self._unreported += 1

    def check_inbound(self) -> None:
        """End the TCP connections that sent more than their budget since the last check.

        Runs only once the monitor queue is empty, so that every fd checked is still the
        connection it was accepted as, and then again after ``INBOUND_CHECK_SHARE`` times
        its own duration."""
        started = time.monotonic()
        if self._inbound is None or started < self._next_inbound_check or not self._apply_events():
            return
        self._end_doomed()
        refill = self.max_inbound_bytes_per_s * (started - self._last_inbound_check)
        self._last_inbound_check = started
        try:
            for fd, budget in list(self._inbound.items()):
                self._charge(fd, budget, refill)
        except TcpInfoTooShort as exc:
            log.warning("not checking the bytes TCP connections send (max_inbound_bytes_per_s): %s", exc)
            self._inbound = None
            return
        self._next_inbound_check = started + INBOUND_CHECK_SHARE * (time.monotonic() - started)

    def _charge(self, fd: int, budget: _Inbound, refill: float) -> None:
        received = bytes_received(fd)
        if received is None:  # gone; its end event is on its way
            return
        sent, budget.received = received - budget.received, received
        budget.tokens = min(INBOUND_BURST_BYTES, budget.tokens + refill) - sent
        if budget.tokens >= 0:
            return
        del self._inbound[fd]
        if end_connection(fd, budget.endpoint):
            self.overdrawn += 1
            self._overdrawn_log.log(
                logging.WARNING, "ended a TCP connection on %s: it sent %d bytes since the last check, "
                "over max_inbound_bytes_per_s=%d with a burst of %d bytes (%d ended in all)",
                budget.endpoint, sent, self.max_inbound_bytes_per_s, INBOUND_BURST_BYTES, self.overdrawn)

    def report_refusals(self) -> None:
        """Log the refusals since the last report, at most once per ``REFUSAL_LOG_EVERY_S``."""
        now = time.monotonic()
        if self._unreported and now - self._last_report >= REFUSAL_LOG_EVERY_S:
            log.warning("refused %d connection(s) since the last report: the frontend holds its cap "
                        "of max_connections=%d (%d refused in all)", self._unreported,
                        self.max_connections, self.refused)
            self._unreported, self._last_report = 0, now

    def close(self) -> None:
        # libzmq's I/O thread blocks, holding the monitor lock, while our end of the monitor is
        # full; drain it first so that disable_monitor (which takes that lock) cannot wait on it.
        self._apply_events()
        self._frontend.disable_monitor()
        self.monitor.close(0)


def _loopback(endpoint: str) -> bool:
    """A TCP endpoint that only this host can reach."""
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or a wildcard
        return False


def cleartext_readers(endpoint: str) -> str:
    """Who can read the batches a TCP endpoint without CURVE sends."""
    return "any user or process on this host" if _loopback(endpoint) else "anyone who can reach this port"
