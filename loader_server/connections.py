"""Bound the number of peer connections the frontend holds.

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

Raising ``RLIMIT_NOFILE``'s soft limit to the hard limit at start, and a
default cap well below it, leave room for everything else the server opens.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("ringfeed.connections")

DEFAULT_MAX_CONNECTIONS = 4096
FD_LIMIT_SHARE = 4  # the default cap is at most a quarter of the fd limit
MAX_EVENTS_PER_CALL = 4096  # one call never holds the broker loop for long
REFUSAL_LOG_EVERY_S = 10.0
_OPENED = zmq.EVENT_ACCEPTED
_ENDED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


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


class ConnectionGuard:
    """Counts the frontend's connections and ends those past ``max_connections``.

    ``handle`` is the monitor's readable-handler (the broker's ``watched``); ``report_refusals``
    runs as broker housekeeping.
    """

    def __init__(self, frontend: zmq.Socket, max_connections: int):
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        self.max_connections = max_connections
        self._frontend = frontend
        self.monitor = frontend.get_monitor_socket(_OPENED | _ENDED)
        self._open: set[int] = set()
        self._doomed: dict[int, str] = {}  # fd -> listener endpoint, past the cap, not yet ended
        self.refused = 0
        self._unreported = 0
        self._last_report = float("-inf")

    @property
    def open(self) -> int:
        return len(self._open)

    def counters(self) -> dict:
        return {"open": self.open, "refused": self.refused, "max": self.max_connections}

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
        return False

    def _on_accepted(self, fd: int, endpoint: str) -> None:
        if len(self._open) < self.max_connections:
            self._open.add(fd)
        else:
            self._doomed[fd] = endpoint

    def _end_doomed(self) -> None:
        doomed, self._doomed = self._doomed, {}
        for fd, endpoint in doomed.items():
            if end_connection(fd, endpoint):
                self.refused += 1
                self._unreported += 1

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
