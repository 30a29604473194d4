"""Autotuned workers (``workers = "auto"``): how many of the started workers get tasks.

The server starts ``max_workers`` warm workers and the broker hands tasks only
to the ``active`` lowest ids; the others wait on their links and use no CPU.
Because a batch is a pure function of (seed, epoch, index), which worker makes
it never shows in the stream.

``AutoWorkers`` is the broker's end: once per tick it turns what the broker's
``Metrics`` counted since the last one (each worker's busy seconds, whether a
client had all its credit back) into an ``Observation`` for ``WorkerTuner``,
which says how many workers are active. A client whose credit is all back has
consumed every batch it was sent: a feed returns its credit right before it
waits (``client/feed.py``), so that is the ring running dry. Everything here is
pure: times come in as arguments, and tests drive it with a fake clock.

``WorkerTuner`` takes its decisions once per window of ``WINDOW_S``:

- add one worker when a client waited on an empty ring ("dry") during the
  window while the active workers were busy at least ``ADD_BUSY`` of it and a
  slot was free (with no free slot more workers could not start anything);
- drop one when for ``drop_windows`` windows in a row no client waited and
  the work done would have kept one worker fewer at most ``DROP_BUSY`` busy.

The gap between ``DROP_BUSY`` and ``ADD_BUSY`` is the hysteresis: after a
drop the remaining workers are at most ``DROP_BUSY`` busy, below what adds
one back. Should the load still flip, each drop that an add undoes within
``REVERT_S`` doubles ``drop_windows`` (up to ``MAX_DROP_WINDOWS``). Ticks in
which no batch was served and no worker was busy (no client reading: between
epochs, during validation) say nothing about the trainer's pace: they do not
count in the shares, and a window of nothing else changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metrics import Interval

WINDOW_S = 1.0
ADD_BUSY = 0.9  # mean busy share of the active workers, over a window, that lets a dry ring add one
DROP_BUSY = 0.7  # the busy share one fewer worker would have, at most, for a drop
DROP_WINDOWS = 3  # quiet windows in a row before a drop: adding back costs a dry window
MAX_DROP_WINDOWS = 48  # the longest a drop waits after drops that had to be undone
REVERT_S = 30.0  # an add this soon after a drop means that drop was wrong
START_WORKERS = 1


@dataclass(frozen=True)
class Observation:
    """What the broker saw since its last tick."""

    busy_s: dict  # worker id -> seconds it had tasks in flight (a worker just dropped may finish some)
    served: int  # batches served to clients
    dry: bool  # a client waited with nothing delivered to it
    free: int  # slots FREE


class WorkerTuner:
    def __init__(self, max_workers: int, now: float, start: int = START_WORKERS):
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.active = max(1, min(start, max_workers))
        self.drop_windows = DROP_WINDOWS
        self._quiet_windows = 0
        self._last_drop: float | None = None
        self._reset(now)

    def _reset(self, now: float) -> None:
        self._window_start = self._last_tick = now
        self._span_s = 0.0  # of the window, the ticks in which something was served or made
        self._busy_s = 0.0
        self._served = 0
        self._dry = False
        self._free_seen = False

    def observe(self, now: float, seen: Observation) -> int:
        """Take one tick's observation; return how many workers are active from now on."""
        busy_s = sum(seen.busy_s.values())
        if seen.served or busy_s:  # an idle tick (nobody reading) would dilute the shares
            self._span_s += now - self._last_tick
        self._last_tick = now
        self._busy_s += busy_s
        self._served += seen.served
        self._dry = self._dry or seen.dry
        self._free_seen = self._free_seen or seen.free > 0
        if now - self._window_start >= WINDOW_S:
            self._decide(now, self._span_s)
        return self.active

    def _decide(self, now: float, span_s: float) -> None:
        """``span_s``: the window's seconds in which something was served or made."""
        if not self._served or not span_s:  # nobody read: nothing learnt, nothing changed
            self._reset(now)
            return
        mean_busy = self._busy_s / (self.active * span_s)
        if self._dry and mean_busy >= ADD_BUSY and self._free_seen and self.active < self.max_workers:
            self._add(now)
        elif self._dry:
            self._quiet_windows = 0
        else:
            self._quiet_windows += 1
            fewer = self.active - 1
            if (fewer >= 1 and self._quiet_windows >= self.drop_windows
                    and self._busy_s <= DROP_BUSY * fewer * span_s):
                self._drop(now)
        self._reset(now)

    def _add(self, now: float) -> None:
        if self._last_drop is not None and now - self._last_drop < REVERT_S:
            self.drop_windows = min(2 * self.drop_windows, MAX_DROP_WINDOWS)
        self.active += 1
        self._quiet_windows = 0

    def _drop(self, now: float) -> None:
        self.active -= 1
        self._quiet_windows = 0
        self._last_drop = now


class AutoWorkers:
    """The broker's end of ``workers = "auto"``: one ``Observation`` per tick, from the
    broker's ``Metrics`` (busy time and waiting clients since the last tick)."""

    def __init__(self, max_workers: int, now: float):
        self.tuner = WorkerTuner(max_workers, now)
        self._served = 0  # the broker's count of batches served, at the last tick

    @property
    def active(self) -> int:
        return self.tuner.active

    def tick(self, now: float, served: int, free: int, interval: Interval) -> int:
        """``served``: the broker's running count of batches served; ``free``: FREE slots now;
        ``interval``: ``Metrics.take_interval()``."""
        seen = Observation(interval.busy_s, served - self._served, interval.dry, free)
        self._served = served
        return self.tuner.observe(now, seen)
