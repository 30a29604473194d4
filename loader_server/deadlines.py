"""Task deadlines: a worker that makes no progress for too long is treated as dead.

A worker is busy while it has tasks in flight, and each report of finished (or
failed) batches is progress. A worker busy for longer than the deadline since
its last progress (SIGSTOPped, deadlocked in a custom op, stuck in a system
call) is killed by the broker; its batches are then recomputed once, as after a
crash. The deadline follows the work: ``TASK_TIMEOUT_FACTOR`` times the median
time per batch over the last ``BATCH_TIME_SAMPLES`` reports, never below the
configured ``task_timeout_s``, so a slow pipeline is not mistaken for a hung one.

Pure bookkeeping: times come in as arguments, so it is tested without processes.
"""

from __future__ import annotations

import statistics
from collections import deque

TASK_TIMEOUT_FACTOR = 10.0
BATCH_TIME_SAMPLES = 64


class ProgressClock:
    def __init__(self, floor_s: float):
        self.floor_s = floor_s
        self._busy_since: dict[int, float] = {}  # worker -> its last progress, while busy
        self._batch_s: deque[float] = deque(maxlen=BATCH_TIME_SAMPLES)

    def assigned(self, worker: int, now: float) -> None:
        """``worker`` got tasks; a worker that was idle starts its clock now."""
        self._busy_since.setdefault(worker, now)

    def progressed(self, worker: int, batches: int, now: float, still_busy: bool) -> None:
        """``worker`` reported ``batches`` finished or failed batches."""
        since = self._busy_since.pop(worker, None)
        if since is not None and batches:
            self._batch_s.append((now - since) / batches)
        if still_busy:
            self._busy_since[worker] = now

    def forget(self, worker: int) -> None:
        self._busy_since.pop(worker, None)

    @property
    def deadline_s(self) -> float:
        if not self._batch_s:
            return self.floor_s
        return max(self.floor_s, TASK_TIMEOUT_FACTOR * statistics.median(self._batch_s))

    def overdue(self, now: float) -> list[tuple[int, float]]:
        """(worker, seconds without progress) of every busy worker past the deadline."""
        deadline = self.deadline_s
        return [(w, now - since) for w, since in self._busy_since.items() if now - since > deadline]
