"""``Feed``: the trainer's end of a ringfeed stream.

One DEALER socket, guarded by a lock because two threads use it: the caller's
(``next_batch``, the generator, tf.data) and a daemon heartbeat thread that
pings the server every ``heartbeat_s / 4``, notices a silent server, and hands
back slots whose arrays have died while the trainer is busy elsewhere (e.g.
in Keras validation). Both go through ``_pump``, which moves whatever has
arrived into an inbox, so neither thread can steal the other's messages.

Credit: the feed asks for ``prefetch`` batches up front and for one more each
time it hands one out, piggybacked on the ACK that returns released slots.
Nothing is a round trip on the hot path.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq

from . import protocol
from .leases import RingMapping, copy_arrays, lease_arrays
from .paths import default_endpoint, pid_namespace

POLL_S = 0.02
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_PREFETCH = 4


class RingfeedError(RuntimeError):
    """Raised by the client for server-side errors and protocol failures."""


class ServerGoneError(RingfeedError, TimeoutError):
    """The server did not answer within ``timeout_s``."""


class RemoteWorkerError(RingfeedError):
    """An exception raised in a worker, with the worker's traceback."""

    def __init__(self, details: dict):
        self.details = details
        self.kind = details.get("kind")
        self.traceback = details.get("traceback", "")
        self.epoch, self.index = details.get("epoch"), details.get("index")
        self.sample = details.get("sample")
        where = f" in batch (epoch {self.epoch}, index {self.index})" if self.epoch is not None else ""
        if self.sample is not None:
            where += f", sample {self.sample}"
        super().__init__(f"{self.kind}{where}: {details.get('message')}"
                         + (f"\n--- worker traceback ---\n{self.traceback}" if self.traceback else ""))


@dataclass(frozen=True)
class FeedSpec:
    batch_size: int
    steps_per_epoch: int
    x_shape: tuple
    x_dtype: np.dtype
    y_shape: tuple
    y_dtype: np.dtype
    samples: int


class Feed:
    """Batches from a ringfeed server, as numpy arrays that alias shared memory.

    ``Feed(endpoint=None, timeout_s=5.0)``: ``None`` means the default local
    service. ``start=(epoch, index)`` resumes a stream; ``copy=True`` copies
    every batch out of the ring instead of lending it.
    """

    def __init__(self, endpoint: str | None = None, *, name: str = "default",
                 timeout_s: float = DEFAULT_TIMEOUT_S, prefetch: int = DEFAULT_PREFETCH,
                 start: tuple[int, int] = (0, 0), copy: bool = False):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
        self.endpoint = endpoint or default_endpoint(name)
        self.timeout_s, self.copy = timeout_s, copy
        self._lock = threading.Lock()
        self._inbox: deque = deque()
        self._released: deque = deque()
        self._lent: set[int] = set()  # slots handed out zero-copy and not yet given back
        self._credit_owed = 0
        self._failure: Exception | None = None
        self._closed = False
        self.stats = {"batches": 0, "wait_s": 0.0}  # wait_s: time next_batch spent blocked on the server
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._last_heard = time.monotonic()
        welcome = self._handshake(start, prefetch)
        layout = welcome["layout"]
        try:
            self._mapping = RingMapping(layout)
        except OSError as exc:
            self._sock.close(0)
            raise RingfeedError(f"cannot map the server's ring segment {layout['segment']!r} ({exc}); "
                                "the client must run on the server's host and IPC namespace") from None
        self.spec = FeedSpec(welcome["batch_size"], welcome["steps_per_epoch"], tuple(layout["x_shape"][1:]),
                             np.dtype(layout["x_dtype"]), tuple(layout["y_shape"][1:]),
                             np.dtype(layout["y_dtype"]), welcome["samples"])
        self.steps_per_epoch = self.spec.steps_per_epoch
        self.heartbeat_s = float(welcome["heartbeat_s"])
        self._next = start[0] * self.steps_per_epoch + start[1]
        self._thread = threading.Thread(target=self._heartbeat_loop, name="ringfeed-heartbeat", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index) of the next batch this feed will return."""
        return divmod(self._next, self.steps_per_epoch)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self._closed:
            raise RingfeedError("this Feed is closed")
        with self._lock:
            self._flush()
            if not self._inbox:
                waited_from = time.perf_counter()
                while not self._inbox:
                    self._raise_failure()
                    self._pump(POLL_S)
                    self._check_alive()
                self.stats["wait_s"] += time.perf_counter() - waited_from
            msg = self._inbox.popleft()
            if msg.flags & protocol.FLAG_COPY or self.copy:
                batch = copy_arrays(self._mapping, msg.slot)
                self._released.append(msg.slot)
            else:
                batch = lease_arrays(self._mapping, msg.slot, self._released)
                self._lent.add(msg.slot)
            self._credit_owed += 1
            self._next += 1
            self.stats["batches"] += 1
            return batch

    def generator(self):
        """An infinite generator of ``(x, y)`` batches, for ``model.fit``."""
        while True:
            yield self.next_batch()

    def as_tf_dataset(self, prefetch: int = 2):
        """A prefetching ``tf.data.Dataset`` whose ``element_spec`` is known without peeking."""
        from .tf_adapter import as_tf_dataset

        return as_tf_dataset(self, prefetch)

    def close(self) -> None:
        """Leave the stream. Arrays already handed out stay valid: their slots are returned
        (by the heartbeat thread) when they die, and only then does the feed say BYE."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for msg in self._inbox:
                self._released.append(msg.slot)
            self._inbox.clear()
            self._flush()

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- socket work (always under self._lock) ------------------------------

    def _handshake(self, start, prefetch) -> dict:
        self._sock.send_multipart(protocol.hello(start[0], start[1], prefetch, os.getpid(), pid_namespace()))
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not self._sock.poll(POLL_S * 1000):
                continue
            frames = self._sock.recv_multipart()
            if frames[0] == protocol.WELCOME:
                return protocol.decode_json(frames[1], "WELCOME")
            if frames[0] == protocol.ERROR:
                self._sock.close(0)
                raise RingfeedError(protocol.parse_error(frames)["message"])
        self._sock.close(0)
        raise ServerGoneError(f"no ringfeed server answered at {self.endpoint} within {self.timeout_s} s; "
                              "is it running? (ringfeed status)")

    def _pump(self, wait_s: float) -> None:
        while self._sock.poll(wait_s * 1000):
            wait_s = 0
            frames = self._sock.recv_multipart()
            self._last_heard = time.monotonic()
            command = frames[0]
            if command == protocol.BATCH:
                msg = protocol.parse_batch(frames)
                if self._closed:
                    self._released.append(msg.slot)
                else:
                    self._inbox.append(msg)
            elif command == protocol.ERROR:
                details = protocol.parse_error(frames)
                self._failure = (RemoteWorkerError(details) if details["kind"] != "ProtocolError"
                                 else RingfeedError(f"server refused a message: {details['message']}"))
            elif command != protocol.PING:
                self._failure = RingfeedError(f"unexpected message {command[:32]!r} from the server")

    def _flush(self) -> None:
        releases = []
        while self._released:
            releases.append(self._released.popleft())
        self._lent.difference_update(releases)
        if releases or self._credit_owed:
            credit = 0 if self._closed else self._credit_owed
            self._sock.send_multipart(protocol.ack(credit, releases))
            self._credit_owed = 0

    def _check_alive(self) -> None:
        silent = time.monotonic() - self._last_heard
        if silent > self.timeout_s and self._failure is None:
            self._failure = ServerGoneError(
                f"the ringfeed server at {self.endpoint} has been silent for {silent:.1f} s "
                f"(timeout_s={self.timeout_s}); it has stopped or died")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_s / 4
        while True:
            time.sleep(interval)
            with self._lock:
                if self._sock.closed:
                    return
                self._pump(0)
                self._flush()
                self._check_alive()
                if self._closed and (not self._lent or self._failure is not None):
                    self._sock.send_multipart([protocol.BYE])
                    self._sock.close(0)
                    return
                self._sock.send_multipart([protocol.PING])
