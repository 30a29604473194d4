"""Where the time goes: rates and shares over a sliding window, for status and Prometheus.

Pure bookkeeping: the broker reports events, a clock passed in says when, and
nothing here touches sockets or processes, so it is tested with a fake clock.

Memory is bounded: the window is a ring of ``BUCKET_S`` buckets, each holding
what happened in its span (samples served, and per worker its busy seconds and
batches done), so a figure over the last ``METRICS_WINDOW_S`` seconds is a sum
over buckets divided by the span they cover, whatever the event rate.

Two kinds of time are spread over buckets as they pass: a worker is busy while
it has tasks in flight (from the broker's side: from its first task to its
report), and the ring is dry for a client while the client has every batch it
was sent consumed and its credit back, i.e. it waits for the next one. The
client says so only by what it returns: a feed gives back all its credit right
before it waits (``client/feed.py``), so this is the server's view of the
trainer's input wait, not the trainer's own ``stats["wait_s"]``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

METRICS_WINDOW_S = 10.0
BUCKET_S = 0.5


@dataclass
class _Bucket:
    number: int = -1  # floor(time / BUCKET_S) of its span
    samples: int = 0
    busy_s: dict = field(default_factory=lambda: defaultdict(float))  # worker -> seconds
    batches: dict = field(default_factory=lambda: defaultdict(int))  # worker -> batches done
    dry_s: float = 0.0  # time some client waited with nothing for it
    client_s: float = 0.0  # time at least one client was connected


@dataclass(frozen=True)
class WorkerFigures:
    busy_share: float  # of the window's span
    batch_s: float | None  # mean busy seconds per batch over the window; None before the first


IDLE_WORKER = WorkerFigures(0.0, None)  # a worker with nothing in the window


@dataclass(frozen=True)
class Interval:
    """What happened since the last ``take_interval``: the worker tuner's tick (``autotune.py``)."""

    busy_s: dict[int, float]  # worker -> seconds it had tasks in flight
    dry: bool  # some client had all its credit back, i.e. waited, at some moment


@dataclass(frozen=True)
class Snapshot:
    uptime_s: float
    window_s: float  # the span the window figures cover (shorter than METRICS_WINDOW_S at first)
    samples_per_s_window: float
    samples_per_s_since_start: float
    samples_total: int
    ring_dry_share: float | None  # of the time a client was connected in the window; None if never
    workers: dict[int, WorkerFigures]


class Metrics:
    def __init__(self, clock, window_s: float = METRICS_WINDOW_S, bucket_s: float = BUCKET_S):
        if not window_s > 0 or not 0 < bucket_s <= window_s:
            raise ValueError(f"need window_s > 0 and 0 < bucket_s <= window_s, got {window_s!r}, {bucket_s!r}")
        self.clock, self.window_s, self.bucket_s = clock, window_s, bucket_s
        self.started = clock()
        self.samples_total = 0
        # Whole buckets for the window, plus the one filling now.
        self._buckets = [_Bucket() for _ in range(math.ceil(window_s / bucket_s) + 1)]
        self._current = self._buckets[0]  # the newest bucket: most events land in it
        self._busy_since: dict[int, float] = {}  # worker -> when its busy time was last accounted
        self._granted: dict[bytes, int] = {}  # client -> the credit it was granted
        self._dry: set[bytes] = set()  # clients with all their credit back
        self._interval_busy: dict[int, float] = defaultdict(float)
        self._interval_dry = False
        self._clients_since = self.started  # when client and dry time were last accounted

    # -- events (each O(1) while nothing changes state: the broker calls them per batch) --

    def served(self, samples: int) -> None:
        self.samples_total += samples
        self._bucket(self.clock()).samples += samples

    def worker_assigned(self, worker: int) -> None:
        """``worker`` got tasks; an idle worker is busy from now."""
        if worker not in self._busy_since:
            self._busy_since[worker] = self.clock()

    def worker_progressed(self, worker: int, batches: int, still_busy: bool) -> None:
        """``worker`` reported ``batches`` finished or failed batches."""
        now = self.clock()
        if batches:
            self._bucket(now).batches[worker] += batches
        if not still_busy and worker in self._busy_since:
            self._add_busy(worker, self._busy_since.pop(worker), now)

    def worker_gone(self, worker: int) -> None:
        """``worker`` exited: the time it was busy until now counts."""
        self.worker_progressed(worker, 0, still_busy=False)

    def client_joined(self, client: bytes, credit: int) -> None:
        self._account_clients()
        self._granted[client] = credit
        self._dry.add(client)  # nothing sent to it yet

    def client_credit(self, client: bytes, credit: int) -> None:
        """``client`` now has ``credit`` batches it may still be sent."""
        granted = self._granted.get(client)
        if granted is not None and (credit >= granted) != (client in self._dry):
            self._account_clients()
            if credit >= granted:
                self._dry.add(client)
                self._interval_dry = True
            else:
                self._dry.discard(client)

    def client_left(self, client: bytes) -> None:
        if client in self._granted:
            self._account_clients()
            del self._granted[client]
            self._dry.discard(client)

    # -- figures ---------------------------------------------------------

    def take_interval(self) -> Interval:
        """Busy seconds per worker, and whether a client waited, since the last call."""
        self._account_busy(self.clock())
        taken = Interval(dict(self._interval_busy), self._interval_dry or bool(self._dry))
        self._interval_busy.clear()
        self._interval_dry = False
        return taken

    def snapshot(self) -> Snapshot:
        now = self.clock()
        self._account_clients()
        self._account_busy(now)
        buckets = self._window(now)
        first = max(self.started, (int(now // self.bucket_s) - len(self._buckets) + 1) * self.bucket_s)
        span = now - first
        uptime = now - self.started
        client_s = sum(b.client_s for b in buckets)
        workers = {}
        for worker in sorted({w for b in buckets for w in (*b.busy_s, *b.batches)}):
            busy = sum(b.busy_s.get(worker, 0.0) for b in buckets)
            done = sum(b.batches.get(worker, 0) for b in buckets)
            workers[worker] = WorkerFigures(_share(busy, span), busy / done if done else None)
        return Snapshot(
            uptime_s=uptime, window_s=span,
            samples_per_s_window=sum(b.samples for b in buckets) / span if span > 0 else 0.0,
            samples_per_s_since_start=self.samples_total / uptime if uptime > 0 else 0.0,
            samples_total=self.samples_total,
            ring_dry_share=_share(sum(b.dry_s for b in buckets), client_s) if client_s > 0 else None,
            workers=workers)

    # -- buckets ---------------------------------------------------------

    def _bucket(self, t: float) -> _Bucket:
        number = int(t // self.bucket_s)
        if self._current.number != number:
            self._current = self._numbered(number)
        return self._current

    def _numbered(self, number: int) -> _Bucket:
        bucket = self._buckets[number % len(self._buckets)]
        if bucket.number != number:
            bucket.__init__(number)  # a span that left the window: reuse it
        return bucket

    def _window(self, now: float) -> list[_Bucket]:
        newest = int(now // self.bucket_s)
        return [b for b in self._buckets if newest - len(self._buckets) < b.number <= newest]

    def _pieces(self, start: float, end: float):
        """(bucket, seconds) for each bucket's share of [start, end) still in the ring."""
        last = int(end // self.bucket_s)
        first = max(int(start // self.bucket_s), last - len(self._buckets) + 1)
        for number in range(first, last + 1):
            seconds = min(end, (number + 1) * self.bucket_s) - max(start, number * self.bucket_s)
            if seconds > 0:
                yield self._numbered(number), seconds

    def _account_busy(self, now: float) -> None:
        """Count the busy workers' time until ``now``; the rest comes when they finish."""
        for worker, since in self._busy_since.items():
            self._add_busy(worker, since, now)
            self._busy_since[worker] = now

    def _add_busy(self, worker: int, start: float, end: float) -> None:
        self._interval_busy[worker] += end - start
        if int(start // self.bucket_s) == int(end // self.bucket_s):  # the usual case, kept cheap
            self._bucket(end).busy_s[worker] += end - start
            return
        for bucket, seconds in self._pieces(start, end):
            bucket.busy_s[worker] += seconds

    def _account_clients(self) -> None:
        """Add the time since the last change to the client and dry totals."""
        now, since = self.clock(), self._clients_since
        self._clients_since = now
        if not self._granted:
            return
        dry = bool(self._dry)
        pieces = ([(self._bucket(now), now - since)] if int(since // self.bucket_s) == int(now // self.bucket_s)
                  else self._pieces(since, now))
        for bucket, seconds in pieces:
            bucket.client_s += seconds
            if dry:
                bucket.dry_s += seconds


def _share(part: float, whole: float) -> float:
    return min(1.0, part / whole) if whole > 0 else 0.0
