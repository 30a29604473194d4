"""The broker <-> worker messages, over each worker's socketpair (``channel.py``).

Server-internal: clients never see them, so they live with the server, not in
the client's wire contract (``client/protocol.py``), whose framing helpers they
use. The broker parses every worker message as strictly as a client's: a
worker runs user code, and a bad frame costs that worker, never the loop.

    W_HELLO {worker, pid}            the worker is warm
    TASK    n x (slot, epoch, index)  batches to make into those slots
    W_DONE  n x (slot, skipped)       made; ``skipped`` samples were replaced (on_error = "skip")
    W_ERROR slot, {kind, message, traceback, sample, position, worker_pid}
    STOP                              finish and exit
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ringfeed import protocol

W_HELLO = b"W_HELLO"
TASK = b"TASK"
W_DONE = b"W_DONE"
W_ERROR = b"W_ERROR"
STOP = b"STOP"
MAX_TASKS_PER_MESSAGE = 64

_TASK = struct.Struct("<Iqq")
_SLOT = struct.Struct("<I")
_DONE = struct.Struct("<II")


class TaskMsg(NamedTuple):
    slot: int
    epoch: int
    index: int


def _unpack_records(fmt: struct.Struct, frames: list, what: str) -> list[tuple]:
    protocol.expect_frames(frames, 2, what)
    buf = memoryview(frames[1])
    count, rest = divmod(buf.nbytes, fmt.size)
    if rest or not 1 <= count <= MAX_TASKS_PER_MESSAGE:
        raise protocol.ProtocolError(f"{what}: expected 1 to {MAX_TASKS_PER_MESSAGE} records of {fmt.size} bytes, "
                            f"got {buf.nbytes} bytes")
    return list(fmt.iter_unpack(buf))


def tasks(msgs: list[TaskMsg]) -> list[bytes]:
    return [TASK, b"".join(_TASK.pack(m.slot, m.epoch, m.index) for m in msgs)]


def parse_tasks(frames: list) -> list[TaskMsg]:
    return [TaskMsg(*fields) for fields in _unpack_records(_TASK, frames, "TASK")]


def worker_done(done: list[tuple[int, int]]) -> list[bytes]:
    """W_DONE for ``done``: (slot, skipped) pairs."""
    return [W_DONE, b"".join(_DONE.pack(slot, skipped) for slot, skipped in done)]


def parse_worker_done(frames: list) -> list[tuple[int, int]]:
    return _unpack_records(_DONE, frames, "W_DONE")


def worker_error(slot: int, details: dict) -> list[bytes]:
    return [W_ERROR, _SLOT.pack(slot), protocol.encode_json(details)]


def parse_worker_error(frames: list) -> tuple[int, dict]:
    protocol.expect_frames(frames, 3, "W_ERROR")
    slot = protocol.unpack(_SLOT, frames[1], "W_ERROR")[0]
    obj = protocol.decode_json(frames[2], "W_ERROR")
    protocol.json_field(obj, "kind", str, "W_ERROR")
    protocol.json_field(obj, "message", str, "W_ERROR")
    return slot, obj


def worker_hello(worker: int, pid: int) -> list[bytes]:
    return [W_HELLO, protocol.encode_json({"worker": worker, "pid": pid})]


def parse_worker_hello(frames: list) -> tuple[int, int]:
    protocol.expect_frames(frames, 2, "W_HELLO")
    obj = protocol.decode_json(frames[1], "W_HELLO")
    return protocol.json_field(obj, "worker", int, "W_HELLO"), protocol.json_field(obj, "pid", int, "W_HELLO")
