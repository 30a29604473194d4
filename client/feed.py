"""``Feed``: the trainer's end of a ringfeed stream from one server.

The link to the server is a ``Connection`` (``client/connection.py``: the
socket, HELLO/WELCOME, reconnecting, the heartbeat thread and the one lock
that the feed's state shares with it). Batches come from the source that the
feed's MODE chose (``client/arrivals.py``) and are handed out as arrays over
the ring (``client/leases.py``) or over their received frames. Several
servers: ``FanInFeed`` (``client/fanin.py``), or ``ringfeed.open_feed`` for an
endpoint list or pattern.

Credit: the feed asks for ``prefetch`` batches up front and for one more each
time it hands one out or raises a failed batch's error, piggybacked on the ACK
that returns released slots. ACKs are coalesced: one per half of the credit
the server granted, or at once when the feed is about to wait. Nothing is a
round trip on the hot path.

Trust: the connection checks everything WELCOME says (``protocol.parse_welcome``);
the feed maps the ring only if the segment is this user's own and carries the
token (``leases.RingMapping``), and only then writes to its mailbox. Slot
numbers from the server are checked against the ring. The default endpoint is
used only in a trusted runtime folder (``paths.trusted_runtime_dir``).

Reconnecting: when the connection drops, or the server dropped this feed, the
feed opens a fresh socket and says HELLO again from the batch it is at; a
server that is back on the same endpoint within ``timeout_s`` continues the
stream (batches are deterministic). Otherwise it raises ``ServerGoneError``.
"""

from __future__ import annotations

import time
from collections import deque

from . import pinning, protocol
from .arrivals import Arrival, open_arrivals
from .batch_stream import BatchStream
from .connection import POLL_S, Connection
from .endpoints import expand_endpoints
from .errors import RingfeedError, ServerGoneError
from .leases import RingMapping, copy_arrays, frame_arrays, lease_arrays
from .paths import check_name, runtime_dir, service_endpoint, trusted_runtime_dir
from .security import client_curve_options
from .spec import FeedSpec, feed_spec

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_PREFETCH = 16  # the server grants at most half its ring
TRANSPORTS = ("auto", "shm", "frames")


def _local_endpoint(name: str) -> str:
    """The endpoint of the local service ``name`` (its state file's, else the default ipc one),
    once its runtime folder is found trustworthy (``PermissionError`` if not): whoever can write
    there could stand in for the server."""
    check_name(name)
    try:
        trusted_runtime_dir()
    except FileNotFoundError:  # and nobody may plant it while we wait for a server to answer
        raise ServerGoneError(f"no ringfeed service {name!r} runs here: its runtime folder "
                              f"{runtime_dir()} does not exist (ringfeed start, or pass an endpoint)") from None
    return service_endpoint(name)


def _one_endpoint(endpoint) -> str:
    """``endpoint``, or the one endpoint its pattern names; several are a fan-in's."""
    if isinstance(endpoint, (list, tuple)):
        raise TypeError(f"Feed takes one endpoint, got a {type(endpoint).__name__} of {len(endpoint)}; to fan "
                        "in from several servers use FanInFeed(endpoints, ...) or ringfeed.open_feed(endpoints, ...)")
    endpoints = expand_endpoints(endpoint)
    if len(endpoints) > 1:
        raise ValueError(f"Feed takes one endpoint, and {endpoint!r} names {len(endpoints)}; to fan in from "
                         f"them use FanInFeed(endpoints, ...) or ringfeed.open_feed({endpoint!r}, ...)")
    return endpoints[0]


class Feed(BatchStream):
    """Batches from one ringfeed server, as numpy arrays that alias shared memory.

    ``Feed(endpoint=None, timeout_s=5.0)``: ``None`` means the local service
    called ``name``; a pattern that names one endpoint, such as
    ``tcp://ringfeed-loader-{2..2}.ringfeed-loader:5555``, is that endpoint
    (``client/endpoints.py``), and a list or pattern of several is refused: fan
    in with ``FanInFeed`` or ``ringfeed.open_feed``. ``start=(epoch, index)``
    resumes a stream; ``copy=True`` copies every batch out of the ring instead
    of lending it. ``transport``: "shm" maps the server's ring (same host),
    "frames" receives each batch's bytes (any host), "auto" maps when it can.
    Feeds that share a ``job`` name split one stream between them;
    ``shard=(i, n)`` asks for batch indices i, i+n, ... of each epoch. For a
    CURVE server give ``curve_server_key`` (its public key file) and
    ``curve_secret_key`` (this client's secret key file, from ``ringfeed
    keys``). ``pin_memory=True`` page-locks the mapped ring for fast copies to
    a CUDA device (needs PyTorch with CUDA; see ``client/pinning.py``); batches
    received as frames are not pinned.
    """

    def __init__(self, endpoint: str | None = None, *, name: str = "default",
                 timeout_s: float = DEFAULT_TIMEOUT_S, prefetch: int = DEFAULT_PREFETCH,
                 start: tuple[int, int] = (0, 0), copy: bool = False, transport: str = "auto",
                 job: str | None = None, shard: tuple[int, int] = (0, 1),
                 curve_server_key: str | None = None, curve_secret_key: str | None = None,
                 pin_memory: bool = False):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.endpoint = _one_endpoint(endpoint) if endpoint else _local_endpoint(name)
        self.transport, self.job, self.shard = transport, job, tuple(shard)
        self.copy, self.prefetch, self.pin_memory = copy, prefetch, pin_memory
        self._cudart = pinning.cuda_runtime() if pin_memory else None
        self._conn = Connection(self.endpoint, timeout_s=timeout_s, prefetch=prefetch, job=job, shard=self.shard,
                                curve=client_curve_options(curve_server_key, curve_secret_key),
                                accept=self._accept)
        self._arrivals = self._mapping = self._layout = None  # of the current connection, from its WELCOME
        self._ready: deque[Arrival] = deque()  # taken in, not yet handed out
        self._released: deque[int] = deque()  # slots to give back with the next ACK
        self._lent: set[int] = set()  # slots handed out zero-copy and not yet given back
        self._credit_owed, self._ack_every = 0, 1
        self._closed = False
        self.last_batch: tuple[int, int] | None = None  # (epoch, index) of the batch returned last
        self.stats = {"batches": 0, "wait_s": 0.0, "reconnects": 0}
        self.spec: FeedSpec | None = None
        self._start, self._next = tuple(start), 0
        self._conn.connect(self._start)
        self._conn.start_heartbeat(self._beat)

    # -- public API -------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index) of the next batch this feed will return (its own shard's next, if sharded)."""
        epoch, k = self.progress
        return epoch, self.shard[0] + k * self.shard[1]

    @property
    def progress(self) -> tuple[int, int]:
        """(epoch, how many of this feed's batches of that epoch it has handed out)."""
        return divmod(self._next, self.steps_per_epoch)

    @property
    def timeout_s(self) -> float:
        """How long the server may stay silent, take no message, or stay away."""
        return self._conn.timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        self._conn.timeout_s = seconds

    @property
    def heartbeat_s(self) -> float:
        """The server's heartbeat, as WELCOME said: the feed pings every quarter of it."""
        return self._conn.heartbeat_s

    def next_batch(self, copy: bool = False) -> tuple:
        """The next batch as ``spec.structure`` puts it together: ``(x, y)`` or ``(x, y, w)``,
        each an array or a dict of arrays by field name; with ``copy``, arrays of their own
        rather than lent ring memory. A batch that failed raises its ``RemoteWorkerError``
        in its place, and the stream goes on after it."""
        if self._closed:
            raise RingfeedError("this Feed is closed")
        with self._conn.lock:
            arrival = self._next_arrival()
            if arrival.failure is not None:
                self._credit_owed += 1
                self._next += 1  # the failed batch's place; the stream goes on after it
                raise arrival.failure
            self.last_batch = arrival.batch
            arrays = self._arrays(arrival, copy)
            self._credit_owed += 1
            self._next += 1
            self.stats["batches"] += 1
            return self.spec.structure.assemble(arrays)

    def seek(self, position: tuple[int, int]) -> None:
        """Make ``position`` (a batch of this feed's shard) the next batch: leave the server and
        say HELLO again from there. Refused while batches are lent, whose slots the server
        would reuse under them."""
        epoch, index = position
        i, n = self.shard
        if self._closed:
            raise RingfeedError("this Feed is closed")
        if (index - i) % n:
            raise ValueError(f"batch {position} is not in this feed's shard {self.shard}")
        with self._conn.lock:
            self._flush()  # counts the lent arrays that have died since the last ACK
            if self._lent:
                raise RingfeedError(f"cannot seek while {len(self._lent)} batches are lent: let their arrays "
                                    "go first (or take copies)")
            if self._conn.disconnected_at is None:
                self._conn.bye()
            self._forget_connection()
            self._start, self._next = (epoch, index), self._sequence((epoch, index))
            self._conn.connect(self._start)

    def close(self) -> None:
        """Leave the stream. Arrays already handed out stay valid: their slots are returned
        (by the heartbeat thread) when they die, and only then does the feed say BYE."""
        with self._conn.lock:  # the heartbeat thread ends once the feed has left
            if self._closed:
                return
            self._closed = True
            self._released.extend(arrival.slot for arrival in self._ready if arrival.slot is not None)
            self._ready.clear()
            self._flush()
            if self._can_leave():  # now, not on the heartbeat thread's next turn: the process may exit first
                self._leave()

    # -- handing out (callers hold the lock) -------------------------------

    def _next_arrival(self) -> Arrival:
        """The next arrival, waiting for it if need be; a feed about to wait gives back first
        everything it can."""
        if not self._ready:
            self._take()
        self._flush(force=not self._ready)
        if not self._ready:
            waited_from = time.perf_counter()
            while not self._ready:
                self._conn.raise_failure()
                if self._conn.disconnected_at is not None:
                    self._reconnect()
                self._wait_once()
            self.stats["wait_s"] += time.perf_counter() - waited_from
        return self._ready.popleft()

    def _arrays(self, arrival: Arrival, copy: bool) -> dict:
        """Every field's array of ``arrival``'s batch: over its frames, copied out of its slot
        (which goes back at once), or lent from the slot."""
        if arrival.frames is not None:
            return frame_arrays(self._layout, arrival.frames)
        if arrival.copy or self.copy or copy:
            arrays = copy_arrays(self._mapping, arrival.slot)
            self._released.append(arrival.slot)
            return arrays
        arrays = lease_arrays(self._mapping, arrival.slot, self._released)
        self._lent.add(arrival.slot)
        return arrays

    def _sequence(self, position: tuple[int, int]) -> int:
        """How many of this feed's batches come before ``position`` (a batch of its shard)."""
        i, n = self.shard
        return position[0] * self.steps_per_epoch + (position[1] - i) // n

    # -- taking in and giving back (callers hold the lock) -------------------

    def _take(self) -> int:
        """Take in what has arrived; how many batches and failures that was. What came before a
        malformed message is kept when its ``ProtocolError`` goes up."""
        arrivals: list[Arrival] = []
        try:
            self._arrivals.take(arrivals)
        finally:
            if not self._closed:
                self._ready.extend(arrivals)
            else:
                self._released.extend(arrival.slot for arrival in arrivals if arrival.slot is not None)
        if self._conn.expired:  # the slots it was told of are no longer this feed's; frames it received are
            self._ready = deque(arrival for arrival in self._ready if arrival.frames is not None)
        return len(arrivals)

    def _pump(self, wait_s: float) -> None:
        """Take in what has arrived; if nothing has, wait up to ``wait_s`` for the socket or monitor."""
        if self._take() or not wait_s:
            return
        if self._arrivals.may_sleep():
            self._conn.wait(wait_s)
        self._take()

    def _wait_once(self) -> None:
        """One slice of a wait: take in what arrives, notice a dead server, and ping it
        (the heartbeat thread waits for the lock meanwhile)."""
        self._pump(POLL_S)
        self._conn.check_alive()
        self._conn.keepalive(self.heartbeat_s / 4)

    def _flush(self, force: bool = True) -> None:
        """Return released slots and owed credit; unless ``force``, only once enough credit is owed."""
        if not force and self._credit_owed < self._ack_every:
            return
        releases = []
        while self._released:
            releases.append(self._released.popleft())
        self._lent.difference_update(releases)
        if (releases or self._credit_owed) and self._conn.ack(0 if self._closed else self._credit_owed, releases):
            self._credit_owed = 0

    def _beat(self) -> bool:
        """One heartbeat (the connection's thread, holding the lock): whether the feed has left."""
        self._conn.read_monitor()
        self._take()
        if self._conn.failure is None:
            self._flush()
            self._conn.check_alive()
        if self._can_leave():
            self._leave()
            return True
        if self._conn.failure is None:
            self._conn.keepalive(0.0)
        return False

    # -- connecting and leaving (callers hold the lock, except during __init__) --

    def _accept(self, welcome: protocol.WelcomeMsg) -> list:
        """Take in a checked WELCOME (the connection's ``accept``): map the ring if this feed may
        and choose how batches arrive; the MODE message to answer with."""
        spec = feed_spec(welcome)
        if self.spec is not None and spec != self.spec:
            raise RingfeedError(f"the server at {self.endpoint} came back with a different stream: {spec} "
                                f"instead of {self.spec}")
        self._layout, self._mapping = welcome.layout, self._map_ring(welcome.layout)
        if self.spec is None:
            i, n = self.shard
            self.steps_per_epoch = len(range(i, spec.steps_per_epoch, n))  # batches per epoch for this feed
            self._next = self._sequence(self._start)
        self.spec = spec
        self._ack_every = max(1, welcome.credit // 2)  # fewer messages, credit still flowing
        self._arrivals = open_arrivals(self._conn, welcome, self._mapping, self._ack_every)
        return protocol.mode(self._arrivals.mode, self._mapping and self._mapping.proof())

    def _map_ring(self, layout) -> RingMapping | None:
        """The server's ring, mapped (and pinned, with ``pin_memory``); None if batches are to come
        as frames."""
        if self.transport == "frames":
            return None
        try:
            mapping = RingMapping(layout)
        except OSError as exc:  # "auto" declines the mapping: batches come as frames instead
            if self.transport == "shm":
                raise RingfeedError(
                    f"cannot map the server's ring segment (WELCOME layout field 'segment' "
                    f"{layout.segment!r}): {exc}; transport='shm' needs the server's host and "
                    "IPC namespace, and a segment this user owns") from None
            return None
        if self._cudart is not None:
            pinning.pin(self._cudart, mapping)
        return mapping

    def _reconnect(self) -> None:
        """The server went away: HELLO a fresh socket from where we are, until ``timeout_s``."""
        self._forget_connection()
        self._conn.reconnect(self.position)
        self.stats["reconnects"] += 1

    def _forget_connection(self) -> None:
        """Drop what the last connection delivered or owed: its slots mean nothing to the next."""
        self._ready.clear()
        self._released = deque()
        self._lent.clear()
        self._credit_owed = 0

    def _can_leave(self) -> bool:
        conn = self._conn
        return self._closed and (not self._lent or conn.failure is not None or conn.disconnected_at is not None)

    def _leave(self) -> None:
        self._conn.leave()
        # Arrays still lent keep the mapping through their leases; let the rest
        # go now, and with it a pinned ring's page lock.
        self._mapping = self._arrivals = None
