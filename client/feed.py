"""``Feed``: the trainer's end of a ringfeed stream.

One DEALER socket, guarded by a lock because two threads use it: the caller's
(``next_batch``, the generator, tf.data) and a daemon heartbeat thread that
pings the server every ``heartbeat_s / 4`` and hands back slots whose arrays
died while the trainer was busy elsewhere (e.g. in Keras validation). Both go
through ``_pump``, which moves whatever has arrived into an inbox, so neither
thread can steal the other's messages.

Credit: the feed asks for ``prefetch`` batches up front and for one more each
time it hands one out or raises a failed batch's error, piggybacked on the ACK
that returns released slots.
ACKs are coalesced: one per half of the credit the server granted, or at once
when the feed is about to wait. Nothing is a round trip on the hot path.

Descriptors of batches in a mapped ring arrive in the feed's shared-memory
mailbox when the server offers one (``client/mailbox.py``): reading one is a
memory read, and the server sends a WAKE message only when the feed sleeps,
once the batches of one ACK's worth of credit are there (or nothing more is
being made). Otherwise they arrive in BATCHES messages.

Trust: the feed checks everything WELCOME says (``protocol.parse_welcome``) and
maps the ring only if the segment is this user's own and carries the token
(``leases.RingMapping``); only then does it write to its mailbox. Slot numbers
from the server are checked against the ring. The default endpoint is used
only in a trusted runtime folder (``paths.trusted_runtime_dir``).

Liveness: a socket monitor reports when the connection drops, and the server
says when it dropped this feed (ERROR "Expired", after a pause longer than
its client timeout). The feed then opens a fresh socket and says HELLO again
from the batch it is at; a server that is back on the same endpoint within
``timeout_s`` continues the stream (batches are deterministic). Otherwise, or
if a connected server stays silent for ``timeout_s``, the feed raises
``ServerGoneError``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import mailbox, pinning, protocol
from .endpoints import expand_endpoints
from .errors import PinMemoryError, RemoteWorkerError, RingfeedError, ServerGoneError
from .leases import RingMapping, copy_arrays, frame_arrays, lease_arrays
from .paths import check_name, pid_namespace, runtime_dir, service_endpoint, trusted_runtime_dir
from .security import client_curve_options
from .structure import Structure

POLL_S = 0.02
PEEKED_BATCHES = 2
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_PREFETCH = 16  # the server grants at most half its ring
BYE_LINGER_MS = 200  # how long a closed socket may still spend sending its BYE
TRANSPORTS = ("auto", "shm", "frames")
_MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


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


@dataclass(frozen=True)
class FieldSpec:
    """One field of every sample: its batches are arrays of ``(batch_size, *shape)``."""

    name: str
    shape: tuple[int, ...]  # of one sample
    dtype: np.dtype


@dataclass(frozen=True)
class FeedSpec:
    """What a stream serves, as WELCOME states it: ``fields`` in slot order, put together as
    ``structure`` says into each ``(x, y)`` or ``(x, y, w)``."""

    batch_size: int
    steps_per_epoch: int
    samples: int
    fields: tuple[FieldSpec, ...]
    structure: Structure

    def field(self, name: str) -> FieldSpec:
        for field in self.fields:
            if field.name == name:
                return field
        raise KeyError(f"no field {name!r}; the fields are {[field.name for field in self.fields]}")


def check_state(state: dict, stream) -> tuple[int, int]:
    """The position in ``state`` (a ``state_dict()``), once it is shown to be of ``stream``'s stream."""
    if not isinstance(state, dict) or not isinstance(state.get("position"), (list, tuple)):
        raise ValueError(f"not a ringfeed state_dict: {state!r}")
    spec = stream.spec
    ours = {"steps_per_epoch": stream.steps_per_epoch, "batch_size": spec.batch_size, "samples": spec.samples}
    theirs = {key: state.get(key) for key in ours}
    if theirs != ours:
        raise ValueError(f"the state_dict is of another stream: {theirs}, this one has {ours}")
    position = tuple(state["position"])
    if (len(position) != 2 or not all(type(v) is int for v in position) or position[0] < 0
            or not 0 <= position[1] < spec.steps_per_epoch):
        raise ValueError(f"state_dict position {state['position']!r}: expected [epoch >= 0, index in "
                         f"0..{spec.steps_per_epoch - 1}]")
    return position


def _feed_spec(welcome: protocol.WelcomeMsg) -> FeedSpec:
    fields = tuple(FieldSpec(field.name, field.shape[1:], np.dtype(field.dtype)) for field in welcome.layout.fields)
    return FeedSpec(welcome.batch_size, welcome.steps_per_epoch, welcome.samples, fields, welcome.structure)


class BatchStream:
    """What every feed builds on its own ``next_batch`` and ``close``: a generator, tf.data, ``with``."""

    def generator(self):
        """An infinite generator of batches, ``(x, y)`` or ``(x, y, w)`` as ``spec.structure``
        says, for ``model.fit``. Its first ``PEEKED_BATCHES`` are copies: Keras keeps the first
        batches of a generator even after the fit ends (Keras 3.15), and a lent batch would hold
        its ring slot for as long."""
        for _ in range(PEEKED_BATCHES):
            yield self.next_batch(copy=True)
        while True:
            yield self.next_batch()

    def torch_generator(self):
        """``generator()`` with each array of a batch as a CPU torch tensor over the same memory
        (``torch.from_numpy``, no copy), in the same structure. Keras on the torch backend
        copies every numpy input (``np.array``) before it sends it to the device; a tensor goes
        to the device as it is, and from a ``pin_memory`` feed's ring at page-locked speed.

        A slot goes back to the ring when its tensors die, but an asynchronous copy from
        page-locked memory (``x.to("cuda", non_blocking=True)``) may still be reading it then.
        So a pinned feed's generator keeps each batch until a CUDA event, recorded on the
        current stream when the caller asks for the next batch, has completed: copies queued
        on that stream are safe. Keras copies with blocking copies."""
        import torch

        batches, structure = self.generator(), self.spec.structure
        if not self.pin_memory:
            while True:  # no local may hold the last batch's arrays while this generator waits
                yield structure.map(torch.from_numpy, next(batches))
        copying: deque = deque()  # (batch, event) that a queued copy may still be reading
        while True:
            batch = structure.map(torch.from_numpy, next(batches))
            yield batch
            event = torch.cuda.Event()
            event.record()  # after whatever the caller queued on its stream for this batch
            copying.append((batch, event))
            del batch
            while copying and copying[0][1].query():
                copying.popleft()

    def keras_input(self):
        """A ``keras.utils.PyDataset`` whose length is the epoch: ``model.fit(feed.keras_input(),
        epochs=E)`` needs no ``steps_per_epoch``, and Keras' epoch e is ringfeed's epoch e
        (see ``client/keras.py``)."""
        from .keras import KerasInput

        return KerasInput(self)

    def state_dict(self) -> dict:
        """Where this stream is, as torchdata's ``StatefulDataLoader`` has it: the position of the
        next batch ``next_batch`` will return, with what identifies the stream. A loop that
        trains each batch as it takes it has trained through exactly this."""
        spec = self.spec
        return {"position": list(self.position), "steps_per_epoch": self.steps_per_epoch,
                "batch_size": spec.batch_size, "samples": spec.samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()`` of the same stream: the next batch is the one it names."""
        self.seek(check_state(state, self))

    def as_tf_dataset(self, prefetch: int = 2):
        """A prefetching ``tf.data.Dataset`` whose ``element_spec`` is known without peeking."""
        from .tf_adapter import as_tf_dataset

        return as_tf_dataset(self, prefetch)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Feed(BatchStream):
    """Batches from a ringfeed server, as numpy arrays that alias shared memory.

    ``Feed(endpoint=None, timeout_s=5.0)``: ``None`` means the local service
    called ``name``; a list of endpoints fans in from several servers (see
    ``fanin.FanInFeed``), and so does a string of comma-separated endpoints or
    one with a range, ``tcp://ringfeed-loader-{0..2}.ringfeed-loader:5555``
    (``client/endpoints.py``). ``start=(epoch, index)`` resumes a stream;
    ``copy=True`` copies every batch out of the ring instead of lending it.
    ``transport``: "shm" maps the server's ring (same host), "frames" receives
    each batch's bytes (any host), "auto" maps when it can. Feeds that share a
    ``job`` name split one stream between them; ``shard=(i, n)`` asks for batch
    indices i, i+n, ... of each epoch. For a CURVE server give
    ``curve_server_key`` (its public key file) and ``curve_secret_key`` (this
    client's secret key file, from ``ringfeed keys``). ``pin_memory=True``
    page-locks the mapped ring for fast copies to a CUDA device (needs PyTorch
    with CUDA; see ``client/pinning.py``); batches received as frames are not pinned.
    """

    def __new__(cls, endpoint=None, **options):
        if isinstance(endpoint, str) and len(endpoints := expand_endpoints(endpoint)) > 1:
            endpoint = endpoints
        if isinstance(endpoint, (list, tuple)):
            from .fanin import FanInFeed

            return FanInFeed(list(endpoint), **options)
        return super().__new__(cls)

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
        self.endpoint = expand_endpoints(endpoint)[0] if endpoint else _local_endpoint(name)
        self.transport, self.job, self.shard = transport, job, tuple(shard)
        self.timeout_s, self.copy, self.prefetch = timeout_s, copy, prefetch
        self.pin_memory = pin_memory
        self._cudart = pinning.cuda_runtime() if pin_memory else None
        self._curve = client_curve_options(curve_server_key, curve_secret_key)
        self._lock = threading.Lock()
        self._inbox: deque = deque()
        self._errors: deque[RemoteWorkerError] = deque()  # mailbox mode: failed batches' details
        self._mailbox: mailbox.Mailbox | None = None
        self._released: deque = deque()
        self._lent: set[int] = set()  # slots handed out zero-copy and not yet given back
        self._credit_owed = 0
        self._failure: Exception | None = None
        self._disconnected_at: float | None = None
        self._closed = False
        self.last_batch: tuple[int, int] | None = None  # (epoch, index) of the batch returned last
        self.stats = {"batches": 0, "wait_s": 0.0, "reconnects": 0}
        self._sock = self._monitor = None
        self.spec: FeedSpec | None = None
        self._start, self._next = tuple(start), 0
        self._connect(self._start)
        self._thread = threading.Thread(target=self._heartbeat_loop, name="ringfeed-heartbeat", daemon=True)
        self._thread.start()

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

    def next_batch(self, copy: bool = False) -> tuple:
        """The next batch as ``spec.structure`` puts it together: ``(x, y)`` or ``(x, y, w)``,
        each an array or a dict of arrays by field name; with ``copy``, arrays of their own
        rather than lent ring memory."""
        if self._closed:
            raise RingfeedError("this Feed is closed")
        with self._lock:
            if not self._inbox:
                self._pump(0)
            self._flush(force=not self._inbox)  # before a wait, give back everything
            if not self._inbox:
                waited_from = time.perf_counter()
                while not self._inbox:
                    self._raise_failure()
                    if self._disconnected_at is not None:
                        self._reconnect()
                    self._wait_once()
                self.stats["wait_s"] += time.perf_counter() - waited_from
            msg, data = self._inbox.popleft()
            if not isinstance(msg, RemoteWorkerError) and msg.flags & protocol.FLAG_ERROR:
                msg = self._stream_error(msg)
            if isinstance(msg, RemoteWorkerError):
                self._next += 1  # the failed batch's place; the stream goes on after it
                self._credit_owed += 1
                raise msg
            self.last_batch = (msg.epoch, msg.index)
            if data is not None:
                arrays = frame_arrays(self._layout, data)
            elif msg.flags & protocol.FLAG_COPY or self.copy or copy:
                arrays = copy_arrays(self._mapping, msg.slot)
                self._released.append(msg.slot)
            else:
                arrays = lease_arrays(self._mapping, msg.slot, self._released)
                self._lent.add(msg.slot)
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
        with self._lock:
            self._flush()  # counts the lent arrays that have died since the last ACK
            if self._lent:
                raise RingfeedError(f"cannot seek while {len(self._lent)} batches are lent: let their arrays "
                                    "go first (or take copies)")
            if self._disconnected_at is None:
                self._say_bye()
            self._forget_connection()
            self._start, self._next = (epoch, index), self._sequence((epoch, index))
            self._connect(self._start)

    def close(self) -> None:
        """Leave the stream. Arrays already handed out stay valid: their slots are returned
        (by the heartbeat thread) when they die, and only then does the feed say BYE."""
        with self._lock:  # the heartbeat thread closes the socket once _closed is set
            if self._closed:
                return
            self._closed = True
            self._released.extend(msg.slot for msg, data in self._inbox
                                  if data is None and not isinstance(msg, RemoteWorkerError)
                                  and not msg.flags & protocol.FLAG_ERROR)
            self._inbox.clear()
            self._flush()
            if self._can_leave():  # now, not on the heartbeat thread's next turn: the process may exit first
                self._leave()

    def _can_leave(self) -> bool:
        return self._closed and (not self._lent or self._failure is not None or self._disconnected_at is not None)

    def _leave(self) -> None:
        """Say BYE (the server logs a clean close, not a vanished client) and close the sockets."""
        if self._disconnected_at is None and not isinstance(self._failure, ServerGoneError):
            self._say_bye()
        self._sock.close(linger=BYE_LINGER_MS)
        self._monitor.close(0)
        # Arrays still lent keep the mapping through their leases; let the rest
        # go now, and with it a pinned ring's page lock.
        self._mapping = self._mailbox = None

    def _say_bye(self) -> None:
        try:
            self._send([protocol.BYE])
        except ServerGoneError:  # a server that takes nothing misses our goodbye, and nothing else
            pass

    # -- connection (callers hold self._lock, except during __init__) -------

    def _open_socket(self) -> None:
        # The socket first: closing it ends its monitor, whose events libzmq's I/O thread (shared
        # by every socket of the process) would otherwise wait to send to a monitor nobody reads.
        for old in (self._sock, self._monitor):
            if old is not None:
                old.close(0)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(min(self.timeout_s * 1000, 2**31 - 1)))  # see _send
        for option, value in self._curve.items():
            sock.setsockopt(option, value)
        self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _connect(self, start: tuple[int, int], deadline: float | None = None) -> None:
        """Open a socket, say HELLO from ``start`` and wait (until ``deadline``) for WELCOME."""
        self._open_socket()
        self._send(protocol.hello(start[0], start[1], self.prefetch, os.getpid(),
                                  pid_namespace(), self.job, self.shard))
        deadline = deadline or time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not self._poller.poll(POLL_S * 1000):
                continue
            self._read_monitor()
            if self._failure is not None:
                self._abandon()
            if not self._sock.poll(0):
                continue
            frames = self._sock.recv_multipart()
            if frames[0] == protocol.WELCOME:
                mode = self._welcome(self._parse_welcome(frames))
                self._send(protocol.mode(mode, self._mapping and self._mapping.proof()))
                self._last_heard = self._last_ping = time.monotonic()
                self._disconnected_at = None
                return
            if frames[0] == protocol.ERROR:
                self._failure = RingfeedError(protocol.parse_error(frames)["message"])
                self._abandon()
        self._failure = ServerGoneError(
            f"no ringfeed server answered at {self.endpoint} within {self.timeout_s} s; "
            "is it running? (ringfeed status)")
        self._abandon()

    def _abandon(self) -> None:
        self._sock.close(0)
        self._monitor.close(0)
        raise self._failure

    def _parse_welcome(self, frames: list) -> protocol.WelcomeMsg:
        try:
            return protocol.parse_welcome(frames, self.prefetch)
        except protocol.ProtocolError as exc:
            self._failure = RingfeedError(f"refusing the server at {self.endpoint}: {exc}")
            self._abandon()

    def _welcome(self, welcome: protocol.WelcomeMsg) -> str:
        """Take in a checked WELCOME; return the mode this feed asks for."""
        layout, spec = welcome.layout, _feed_spec(welcome)
        if self.spec is not None and spec != self.spec:
            self._failure = RingfeedError(f"the server at {self.endpoint} came back with a different "
                                          f"stream: {spec} instead of {self.spec}")
            self._abandon()
        self._layout, self._mapping = layout, None
        if self.transport != "frames":
            try:
                self._mapping = RingMapping(layout)
            except OSError as exc:  # "auto" declines the mapping: batches come as frames instead
                if self.transport == "shm":
                    self._failure = RingfeedError(
                        f"cannot map the server's ring segment (WELCOME layout field 'segment' "
                        f"{layout.segment!r}): {exc}; transport='shm' needs the server's host and "
                        "IPC namespace, and a segment this user owns")
                    self._abandon()
        if self._mapping is not None and self._cudart is not None:
            try:
                pinning.pin(self._cudart, self._mapping)
            except PinMemoryError as exc:
                self._failure = exc
                self._abandon()
        if self.spec is None:
            i, n = self.shard
            self.steps_per_epoch = len(range(i, spec.steps_per_epoch, n))  # batches per epoch for this feed
            self._next = self._sequence(self._start)
        self.spec = spec
        self.heartbeat_s = welcome.heartbeat_s
        self._ack_every = max(1, welcome.credit // 2)  # fewer messages, credit still flowing
        self._mailbox = None
        if self._mapping is None:
            return "frames"
        if welcome.mailbox is None or not mailbox.supported():
            return "shm"
        k, token = welcome.mailbox
        self._mailbox = mailbox.open_mailbox(self._mapping.base, layout.mailbox_offset, layout.mailbox_capacity, k)
        self._mailbox.attach(token)
        return "mailbox"

    def _reconnect(self) -> None:
        """The server went away: HELLO a fresh socket from where we are, until ``timeout_s``."""
        deadline = max(self._disconnected_at + self.timeout_s, time.monotonic() + 2 * POLL_S)
        self._forget_connection()
        try:
            self._connect(self.position, deadline)
        except ServerGoneError:
            self._failure = ServerGoneError(
                f"the ringfeed server at {self.endpoint} went away and was not back within "
                f"timeout_s={self.timeout_s}")
            raise self._failure from None
        self.stats["reconnects"] += 1

    def _sequence(self, position: tuple[int, int]) -> int:
        """How many of this feed's batches come before ``position`` (a batch of its shard)."""
        i, n = self.shard
        return position[0] * self.steps_per_epoch + (position[1] - i) // n

    def _forget_connection(self) -> None:
        """Drop what the last connection delivered or owed: its slots mean nothing to the next."""
        self._inbox.clear()
        self._errors.clear()
        self._released = deque()
        self._lent.clear()
        self._credit_owed = 0

    # -- socket work (callers hold self._lock) -------------------------------

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._disconnected_at = self._disconnected_at or time.monotonic()
            else:
                self._failure = RingfeedError(f"the server at {self.endpoint} refused this client's "
                                              "CURVE handshake (wrong or missing key)")

    def _pump(self, wait_s: float) -> None:
        """Take in what has arrived; if nothing has, wait up to ``wait_s`` for the socket or monitor."""
        if self._drain() or not wait_s:
            return
        if self._mailbox is not None and not self._mailbox.sleep(self._ack_every):
            self._drain()  # records came while we asked for a WAKE
            return
        if self._monitor in dict(self._poller.poll(wait_s * 1000)):
            self._read_monitor()
        self._drain()

    def _drain(self) -> int:
        count = self._take_mailbox() if self._mailbox is not None else 0
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return count
            self._receive(frames)
            count += 1

    def _take_mailbox(self) -> int:
        try:
            records = self._mailbox.take(self._layout.slots)
        except (mailbox.MailboxLost, protocol.ProtocolError) as exc:
            self._failure = RingfeedError(f"the server at {self.endpoint}: {exc}")
            self._mailbox = None
            return 0
        if records:
            self._last_heard = time.monotonic()
        for msg in records:
            if not self._closed:
                self._inbox.append((msg, None))
            elif not msg.flags & protocol.FLAG_ERROR:
                self._released.append(msg.slot)
        return len(records)

    def _stream_error(self, record: protocol.BatchMsg) -> RemoteWorkerError:
        """The details of a failed batch, whose ERROR was sent before its mailbox record;
        if the connection goes first, an error naming the batch without them."""
        deadline = time.monotonic() + self.timeout_s
        while not self._errors:
            self._raise_failure()
            if self._disconnected_at is not None or time.monotonic() > deadline:
                return RemoteWorkerError({"kind": "WorkerError", "epoch": record.epoch, "index": record.index,
                                          "message": "the batch failed; its details were lost with the "
                                                     "connection"})
            self._wait_once()
        return self._errors.popleft()

    def _wait_once(self) -> None:
        """One slice of a wait: take in what arrives, notice a dead server, and ping it
        (the heartbeat thread waits for our lock meanwhile)."""
        self._pump(POLL_S)
        self._check_alive()
        self._keepalive(self.heartbeat_s / 4)

    def _receive(self, frames: list[zmq.Frame]) -> None:
        self._last_heard = time.monotonic()
        command = frames[0].bytes
        if command == protocol.BATCHES:
            if self._mapping is None:
                raise protocol.ProtocolError("BATCHES (slot descriptors) sent to a feed in frames mode")
            for msg in protocol.parse_batches(frames):
                if not msg.slot < self._layout.slots:  # its arrays would lie outside the mapping
                    self._failure = RingfeedError(f"the server at {self.endpoint}: BATCHES: record for slot "
                                                  f"{msg.slot}, expected 0 to {self._layout.slots - 1}")
                    return
                if self._closed:
                    self._released.append(msg.slot)
                else:
                    self._inbox.append((msg, None))
        elif command == protocol.BATCH:
            msg = protocol.parse_batch(frames, len(self._layout.fields))
            if self._mapping is not None:
                raise protocol.ProtocolError("BATCH (bytes) sent to a feed in shm mode")
            if not self._closed:
                self._inbox.append((msg, frames[2:]))
        elif command == protocol.ERROR:
            details = protocol.parse_error(frames)
            if details["kind"] == protocol.EXPIRED:
                self._expired()
            elif details["kind"] == "ProtocolError":
                self._failure = RingfeedError(f"server refused a message: {details['message']}")
            elif "index" in details and self._mailbox is not None:  # its mailbox record says where
                self._errors.append(RemoteWorkerError(details))
            elif "index" in details:  # a failed batch, in its place in the stream
                self._inbox.append((RemoteWorkerError(details), None))
            else:
                self._failure = RemoteWorkerError(details)
        elif command not in (protocol.PING, protocol.WAKE):
            self._failure = RingfeedError(f"unexpected message {command[:32]!r} from the server")

    def _expired(self) -> None:
        """The server dropped this feed (it was silent too long): the slots it was told of are
        no longer its own, but batches received as frames are. Say HELLO again when they run out."""
        self._inbox = deque(item for item in self._inbox if item[1] is not None)
        self._mailbox = None
        self._disconnected_at = self._disconnected_at or time.monotonic()

    def _flush(self, force: bool = True) -> None:
        """Return released slots and owed credit; unless ``force``, only once enough credit is owed."""
        if not force and self._credit_owed < self._ack_every:
            return
        releases = []
        while self._released:
            releases.append(self._released.popleft())
        self._lent.difference_update(releases)
        if (releases or self._credit_owed) and self._disconnected_at is None:
            self._send(protocol.ack(0 if self._closed else self._credit_owed, releases))
            self._credit_owed = 0

    def _keepalive(self, every_s: float) -> None:
        """PING the server unless this feed pinged it less than ``every_s`` ago."""
        now = time.monotonic()
        if self._disconnected_at is None and now - self._last_ping >= every_s:
            self._send([protocol.PING])
            self._last_ping = now

    def _send(self, frames: list) -> None:
        """Send ``frames``, waiting at most ``timeout_s`` for room: a DEALER whose server takes
        nothing queues up to its high-water mark and would then block for ever."""
        try:
            self._sock.send_multipart(frames)
        except zmq.Again:
            self._failure = self._failure or ServerGoneError(
                f"the ringfeed server at {self.endpoint} took no message for {self.timeout_s} s "
                f"(timeout_s); it has stopped or hangs")
            raise self._failure from None

    def _check_alive(self) -> None:
        silent = time.monotonic() - self._last_heard
        if silent > self.timeout_s and self._failure is None and self._disconnected_at is None:
            self._failure = ServerGoneError(
                f"the ringfeed server at {self.endpoint} has been silent for {silent:.1f} s "
                f"(timeout_s={self.timeout_s}); it has stopped or hangs")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _heartbeat_loop(self) -> None:
        while True:
            time.sleep(self.heartbeat_s / 4)
            with self._lock:
                if self._sock.closed:
                    return
                try:
                    if self._beat():
                        return
                except Exception as exc:  # the thread must outlive it: see _beat
                    if self._failure is None:
                        self._failure = exc if isinstance(exc, (RingfeedError, protocol.ProtocolError)) else \
                            RingfeedError(f"the server at {self.endpoint}: {type(exc).__name__}: {exc}")

    def _beat(self) -> bool:
        """One heartbeat: whether the feed has left. Whatever goes wrong here (a bad message, a
        server that takes nothing) becomes the feed's failure, and the thread goes on: it is what
        reads the socket's monitor, and libzmq's I/O thread, shared by every socket of the
        process, waits while a monitor's queue is full."""
        self._read_monitor()
        self._pump(0)
        if self._failure is None:
            self._flush()
            self._check_alive()
        if self._can_leave():
            self._leave()
            return True
        if self._failure is None:
            self._keepalive(0.0)
        return False
