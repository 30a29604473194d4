"""A worker process: compute batches (epoch, index) straight into ring slots.

The worker maps the dataset and the ring, compiles (or loads from numba's
cache) the pipeline, and only then says W_HELLO, so the broker never hands a
task to a cold worker. Each TASK names a slot that the broker has marked
FILLING for this worker; the worker writes the batch there and answers W_DONE,
or W_ERROR with its traceback. It never changes slot states itself. A TASK
message may carry several tasks, which the worker queues and runs in order.
Batches that take under ``DONE_COALESCE_S`` are reported together; a slow
batch right after such quick ones delays their report once.

Workers run at ``worker_nice``: when a trainer on the same host wants the
CPU, its threads win, and the ring's prefetched batches cover the difference;
when the ring runs dry the trainer blocks and the workers get the CPU.

Workers die with the server: ``PR_SET_PDEATHSIG`` (Linux) kills them when the
server process goes, and every poll timeout also checks the parent's pid.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq

from client import protocol

from .batches import BatchMaker, SampleError
from .config import Config
from .procs import die_with_parent
from .ring import Layout, Ring
from .sources import SourceRef

POLL_MS = 500
DONE_COALESCE_S = 0.0002  # tiny batches are reported together, so messages do not set the pace


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: int
    endpoint: str
    config: Config
    source: SourceRef
    layout: Layout
    parent_pid: int


def worker_main(spec: WorkerSpec) -> None:
    die_with_parent(spec.parent_pid)
    os.nice(spec.config.worker_nice)  # warming up too: a restart must not starve running workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    import numba

    numba.set_num_threads(min(spec.config.threads_per_worker, numba.config.NUMBA_NUM_THREADS))
    maker = BatchMaker(spec.config, spec.source)
    ring = Ring(spec.layout, create=False)
    maker.make(0, 0, np.empty_like(ring.x[0]), np.empty_like(ring.y[0]))  # compile before W_HELLO

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"w{spec.worker_id}-{os.getpid()}".encode())
    sock.connect(spec.endpoint)
    sock.send_multipart(protocol.worker_hello(spec.worker_id, os.getpid()))
    try:
        _serve(sock, maker, ring, spec.parent_pid)
    finally:
        sock.close(0)


def _serve(sock: zmq.Socket, maker: BatchMaker, ring: Ring, parent_pid: int) -> None:
    """Run tasks in the order they came. A finished batch is reported at once, unless every
    batch since the last report took under ``DONE_COALESCE_S`` and another task is queued."""
    tasks: deque[protocol.TaskMsg] = deque()
    done: list[tuple[int, int]] = []
    first_start = 0.0
    while True:
        if not tasks and not sock.poll(POLL_MS):
            if os.getppid() != parent_pid:
                return
            continue
        if not _take_tasks(sock, tasks):
            return
        if not tasks:
            continue
        task = tasks.popleft()
        started = time.perf_counter()
        try:
            skipped = maker.make(task.epoch, task.index, ring.x[task.slot], ring.y[task.slot])
        except Exception as exc:  # travels to the client as data
            _report(sock, done)
            sock.send_multipart(protocol.worker_error(task.slot, _error_details(exc, task)))
            continue
        first_start = first_start if done else started
        done.append((task.slot, skipped))
        if not tasks or time.perf_counter() - first_start >= DONE_COALESCE_S:
            _report(sock, done)


def _take_tasks(sock: zmq.Socket, tasks: deque) -> bool:
    """Queue every TASK that has arrived; False once STOP has."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return True
        command = frames[0].bytes
        if command == protocol.STOP:
            return False
        if command == protocol.TASK:  # only the broker can reach this socket; ignore what we don't know
            tasks.extend(protocol.parse_tasks([f.bytes for f in frames]))


def _report(sock: zmq.Socket, done: list) -> None:
    if done:
        sock.send_multipart(protocol.worker_done(done))
        done.clear()


def _error_details(exc: Exception, task: protocol.TaskMsg) -> dict:
    details = {"epoch": task.epoch, "index": task.index, "worker_pid": os.getpid()}
    if isinstance(exc, SampleError):
        return {**details, "kind": type(exc.cause).__name__, "message": str(exc.cause),
                "traceback": exc.trace, "sample": exc.sample, "position": exc.position}
    return {**details, "kind": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
