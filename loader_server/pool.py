"""Start, watch, replace and stop the worker processes (``spawn`` context).

Each worker gets a fresh socketpair to the broker (``channel.py``); the
broker polls its end and each worker's ``sentinel`` fd next to its sockets,
so a dead worker (SIGKILL, segfault, OOM) is noticed at once. Restarts are
limited to ``max_worker_restarts`` per ``RESTART_WINDOW_S``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from dataclasses import replace

from . import channel
from .worker import WorkerSpec, worker_main

log = logging.getLogger("ringfeed.pool")

RESTART_WINDOW_S = 60.0
JOIN_TIMEOUT_S = 3.0


class RestartLimitError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, spec: WorkerSpec, count: int, max_restarts: int):
        self._ctx = mp.get_context("spawn")
        self._spec = spec
        self._max_restarts = max_restarts
        self._restarts: deque[float] = deque()
        self.restarts_total = 0
        self.procs: dict[int, mp.Process] = {}
        self.channels: dict[int, channel.Channel] = {}  # the broker's end of each worker's link
        for worker_id in range(count):
            self.start(worker_id)

    def start(self, worker_id: int) -> None:
        """Start worker ``worker_id``; an ``OSError`` (EMFILE, say) leaves it unregistered."""
        broker_end, worker_end = channel.pair()
        proc = self._ctx.Process(target=worker_main, args=(replace(self._spec, worker_id=worker_id), worker_end),
                                 name=f"ringfeed-worker-{worker_id}", daemon=True)
        try:
            proc.start()
        except BaseException:
            broker_end.close()
            raise
        finally:
            worker_end.close()  # the worker has its own copy; ours would hide the worker's exit
        self.procs[worker_id] = proc
        self.channels[worker_id] = channel.Channel(broker_end)

    def sentinels(self) -> dict[int, int]:
        """fd -> worker id, for every worker process still registered."""
        return {proc.sentinel: wid for wid, proc in self.procs.items()}

    def replace_dead(self, worker_id: int) -> int | None:
        """Reap worker ``worker_id`` and start a new one; return the dead one's exit code.
        ``RestartLimitError`` past the limit; an ``OSError`` from the start (the restart is
        counted, and the caller retries ``start``)."""
        proc = self.procs.pop(worker_id)
        proc.join(JOIN_TIMEOUT_S)
        code = proc.exitcode
        proc.close()
        self.channels.pop(worker_id).close()
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= self._max_restarts:
            raise RestartLimitError(f"{len(self._restarts)} worker restarts in the last "
                                    f"{RESTART_WINDOW_S:.0f} s (max_worker_restarts={self._max_restarts})")
        self._restarts.append(now)
        self.restarts_total += 1
        log.warning("worker %d exited with code %s; starting a replacement", worker_id, code)
        self.start(worker_id)
        return code

    def kill(self, worker_id: int) -> None:
        """SIGKILL a worker that broke its link; its sentinel then reports it as dead."""
        if worker_id in self.procs:
            self.procs[worker_id].kill()

    def pid(self, worker_id: int) -> int | None:
        proc = self.procs.get(worker_id)
        return proc.pid if proc else None

    def alive(self) -> int:
        return sum(proc.is_alive() for proc in self.procs.values())

    def stop(self) -> None:
        """Wait for workers told to STOP, then terminate and kill whatever is left."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_TIMEOUT_S)
        self.procs.clear()
        for link in self.channels.values():
            link.close()
        self.channels.clear()
