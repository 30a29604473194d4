"""A worker process: compute batches (epoch, index) straight into ring slots.

The worker maps the dataset and the ring, compiles (or loads from numba's
cache) the pipeline, and only then says W_HELLO, so the broker never hands a
task to a cold worker. It talks to the broker over its own socketpair
(``channel.py``). Each TASK names a slot that the broker has marked
FILLING for this worker; the worker writes the batch there and answers W_DONE,
or W_ERROR with its traceback. It never changes slot states itself. A TASK
message may carry several tasks, which the worker queues and runs in order.
Finished batches are reported together while, since the last report, they
took under ``DONE_COALESCE_S`` in all and more tasks are queued than are
waiting to be reported: each report wakes the broker, which costs tens of
microseconds of CPU that a small host takes from the workers, but the credit
a report frees must come back as new tasks before the queue runs dry. A batch
slower than that is reported at once; a slow batch right after quick ones
delays their report once.

Workers run at ``worker_nice``: when a trainer on the same host wants the
CPU, its threads win, and the ring's prefetched batches cover the difference;
when the ring runs dry the trainer blocks and the workers get the CPU.

Workers die with the server: ``PR_SET_PDEATHSIG`` (Linux) kills them when the
server process goes, and every poll timeout also checks the parent's pid.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass

from ringfeed.layout import RingLayout

from . import worker_protocol
from .batches import BatchMaker, SampleError
from .channel import Channel, ChannelError
from .config import Config
from .procs import die_with_parent
from .ring import Ring
from .shm import FileId
from .sources import SourceRef

POLL_MS = 500
DONE_COALESCE_S = 0.004  # how late a report may be; quick batches go by half the queue


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: int
    config: Config
    source: SourceRef
    layout: RingLayout
    parent_pid: int
    ring_id: FileId  # the ring file the server created; kept out of Layout, which clients receive


def worker_main(spec: WorkerSpec, link: socket.socket) -> None:
    die_with_parent(spec.parent_pid)
    os.nice(spec.config.worker_nice)  # warming up too: a restart must not starve running workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    import numba

    numba.set_num_threads(min(spec.config.threads_per_worker, numba.config.NUMBA_NUM_THREADS))
    maker = BatchMaker(spec.config, spec.source)
    ring = Ring(spec.layout, create=False, file_id=spec.ring_id)
    # Compile before W_HELLO, into buffers aligned as the slots are, so the same kernels compile.
    maker.make(0, 0, maker.empty_batch(), spec.config.streaming_stores)

    channel = Channel(link)
    try:
        channel.send(worker_protocol.worker_hello(spec.worker_id, os.getpid()))
        _serve(channel, maker, ring, spec.parent_pid)
    except ChannelError as exc:  # the broker is gone, or stopped reading for SEND_TIMEOUT_S
        print(f"ringfeed worker {spec.worker_id} (pid {os.getpid()}): {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        channel.close()


def _serve(channel: Channel, maker: BatchMaker, ring: Ring, parent_pid: int) -> None:
    """Run tasks in the order they came. A finished batch is reported at once, unless the
    batches since the last report took under ``DONE_COALESCE_S`` and are fewer than the
    tasks still queued."""
    waiter = select.poll()
    waiter.register(channel.fileno(), select.POLLIN)
    tasks: deque[worker_protocol.TaskMsg] = deque()
    done: list[tuple[int, int]] = []
    first_start = 0.0
    while True:
        if not tasks and not waiter.poll(POLL_MS):
            if os.getppid() != parent_pid:
                return
            continue
        if not _take_tasks(channel, tasks):
            return
        if not tasks:
            continue
        task = tasks.popleft()
        started = time.perf_counter()
        try:
            skipped = maker.make(task.epoch, task.index, ring.arrays[task.slot], maker.config.streaming_stores)
        except Exception as exc:  # travels to the client as data
            _report(channel, done)
            channel.send(worker_protocol.worker_error(task.slot, _error_details(exc, task)))
            continue
        first_start = first_start if done else started
        done.append((task.slot, skipped))
        if len(done) >= len(tasks) or time.perf_counter() - first_start >= DONE_COALESCE_S:
            _report(channel, done)


def _take_tasks(channel: Channel, tasks: deque) -> bool:
    """Queue every TASK that has arrived; False once STOP has."""
    for frames in channel.receive():
        command = frames[0] if frames else b""
        if command == worker_protocol.STOP:
            return False
        if command == worker_protocol.TASK:  # only the broker holds the other end; ignore what we don't know
            tasks.extend(worker_protocol.parse_tasks(frames))
    return not channel.closed


def _report(channel: Channel, done: list) -> None:
    if done:
        channel.send(worker_protocol.worker_done(done))
        done.clear()


def _error_details(exc: Exception, task: worker_protocol.TaskMsg) -> dict:
    details = {"epoch": task.epoch, "index": task.index, "worker_pid": os.getpid()}
    if isinstance(exc, SampleError):
        return {**details, "kind": type(exc.cause).__name__, "message": str(exc.cause),
                "traceback": exc.trace, "sample": exc.sample, "position": exc.position}
    return {**details, "kind": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
