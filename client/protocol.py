"""The ringfeed wire protocol: commands, frame builders and strict parsers.

Every message is a ZeroMQ multipart message ``[command, payload?]``. Fixed
records are packed little-endian with ``struct``; variable records are UTF-8
JSON objects of at most ``MAX_JSON_BYTES``. Nothing is ever unpickled or
evaluated: every parser checks frame count, size and types, and raises
``ProtocolError`` naming what it got and what it expected.

Client <-> broker (the client's DEALER talks to the broker's ROUTER)::

    HELLO  {version, start: [epoch, index], credit, pid, pidns, job?, shard?: [i, n]}
                                                      -> WELCOME {layout, spec..., credit (granted),
                                                                  mailbox?: [k, token]}
    MODE   b"frames" | b"shm" <proof> | b"mailbox" <proof>
                                                      (how batches travel; streaming starts. A client
                                                       that maps the ring proves it with the
                                                       PROOF_BYTES at PROOF_OFFSET of the segment,
                                                       which never travel over a socket)
    ACK    <credit:u32> <slot:u32>*                   (more credit, released slots)
    PING                                              (liveness, both directions)
    BYE                                               (client leaves; its slots are freed)
    STATUS                                            -> STATUS {counters...}
    BATCH  <slot:u32 flags:u32 epoch:i64 index:i64 seq:u64> x-bytes y-bytes
                                                      (broker -> client, "frames" mode)
    BATCHES <slot:u32 flags:u32 epoch:i64 index:i64 seq:u64>+   (broker -> client, "shm" mode:
                                                       every batch that became ready at once)
    WAKE                                              ("mailbox" mode: records are waiting in the
                                                       shared-memory mailbox named in WELCOME;
                                                       see client/mailbox.py)
    ERROR  {kind, message, traceback?, epoch?, index?, sample?} (broker -> client; kind
                                                       "Expired": the server dropped this client,
                                                       which may say HELLO again from where it is)

Worker <-> broker (each worker's own socketpair, see loader_server/channel.py)::

    W_HELLO {worker, pid}          worker is warm and ready for tasks
    TASK   <slot:u32 epoch:i64 index:i64>+       (one or more tasks)
    W_DONE <slot:u32 skipped:u32>+      (one or more finished; skipped: samples replaced
                                         under on_error="skip")
    W_ERROR <slot:u32> {kind, message, traceback, epoch, index, sample}
    STOP
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 3  # 3: MODE carries the ring proof; ERROR "Expired"
MAX_JSON_BYTES = 64 * 1024
MAX_POSITION = 2**31 - 1  # epochs and batch indices; epoch * batches per epoch stays in an i64
MAX_PID = 2**31 - 1
MAX_RELEASES_PER_ACK = 4096

HELLO = b"HELLO"
WELCOME = b"WELCOME"
MODE = b"MODE"
MODES = (b"shm", b"frames", b"mailbox")
TOKEN_BYTES = 16  # the ring segment starts with its token, which WELCOME names
PROOF_OFFSET, PROOF_BYTES = TOKEN_BYTES, 16  # then a secret that only a mapping can read
MAX_JOB_CHARS = 64
MAX_SHARDS = 1024
ACK = b"ACK"
PING = b"PING"
BYE = b"BYE"
STATUS = b"STATUS"
BATCH = b"BATCH"
BATCHES = b"BATCHES"
WAKE = b"WAKE"
MAX_BATCHES_PER_MESSAGE = 4096
ERROR = b"ERROR"
EXPIRED = "Expired"  # the ERROR kind that tells a client it was dropped

W_HELLO = b"W_HELLO"
TASK = b"TASK"
W_DONE = b"W_DONE"
W_ERROR = b"W_ERROR"
STOP = b"STOP"

FLAG_COPY = 1  # the client must copy the batch out and release the slot at once
FLAG_ERROR = 2  # "mailbox" mode: this batch failed; its ERROR message is on the socket
MAX_TASKS_PER_MESSAGE = 64

_BATCH = struct.Struct("<IIqqQ")
_TASK = struct.Struct("<Iqq")
_SLOT = struct.Struct("<I")
_DONE = struct.Struct("<II")
_U32 = struct.Struct("<I")


class ProtocolError(ValueError):
    """A frame that does not follow the protocol."""


@dataclass(frozen=True, slots=True)
class BatchMsg:
    slot: int
    flags: int
    epoch: int
    index: int
    seq: int


@dataclass(frozen=True, slots=True)
class TaskMsg:
    slot: int
    epoch: int
    index: int


def _expect_frames(frames: list, count: int, what: str) -> None:
    if len(frames) != count:
        raise ProtocolError(f"{what}: expected {count} frame(s), got {len(frames)}")


def _unpack(fmt: struct.Struct, frame, what: str) -> tuple:
    buf = memoryview(frame)
    if buf.nbytes != fmt.size:
        raise ProtocolError(f"{what}: expected a {fmt.size}-byte record, got {buf.nbytes} bytes")
    return fmt.unpack(buf)


def encode_json(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(f"JSON payload of {len(data)} bytes exceeds {MAX_JSON_BYTES}")
    return data


def decode_json(frame, what: str) -> dict:
    buf = memoryview(frame)
    if buf.nbytes > MAX_JSON_BYTES:
        raise ProtocolError(f"{what}: JSON payload of {buf.nbytes} bytes exceeds {MAX_JSON_BYTES}")
    try:
        obj = json.loads(bytes(buf).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: payload is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError(f"{what}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def json_field(obj: dict, key: str, kind: type | tuple, what: str, default=None):
    """Read ``obj[key]`` and check its type; bools are not accepted as ints."""
    if key not in obj:
        if default is not None:
            return default
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"{what}: field {key!r} must be {kind}, got bool")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{what}: field {key!r} must be {kind}, got {type(value).__name__}")
    return value


# -- client -> broker ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HelloMsg:
    epoch: int
    index: int
    credit: int
    pid: int  # the client's pid, meaningful only within the pid namespace ``pidns``
    pidns: str
    job: str | None = None  # clients naming the same job split one stream
    shard: tuple[int, int] = (0, 1)  # this client wants batch indices i, i+n, i+2n, ... of each epoch


def hello(start_epoch: int, start_index: int, credit: int, pid: int, pidns: str,
          job: str | None = None, shard: tuple[int, int] = (0, 1)) -> list[bytes]:
    body = {"version": PROTOCOL_VERSION, "start": [start_epoch, start_index], "credit": credit,
            "pid": pid, "pidns": pidns, "shard": list(shard)}
    if job is not None:
        body["job"] = job
    return [HELLO, encode_json(body)]


def parse_hello(frames: list) -> HelloMsg:
    _expect_frames(frames, 2, "HELLO")
    obj = decode_json(frames[1], "HELLO")
    version = json_field(obj, "version", int, "HELLO")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"HELLO: protocol version {version} is not supported (expected {PROTOCOL_VERSION})")
    start = json_field(obj, "start", list, "HELLO")
    if len(start) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_POSITION
                                  for v in start):
        raise ProtocolError(f"HELLO: 'start' must be [epoch, index] of ints in [0, {MAX_POSITION}], "
                            f"got {start!r:.80}")
    credit = json_field(obj, "credit", int, "HELLO")
    if not 1 <= credit <= 1 << 16:
        raise ProtocolError(f"HELLO: credit must be in [1, 65536], got {credit}")
    pid = json_field(obj, "pid", int, "HELLO")
    pidns = json_field(obj, "pidns", str, "HELLO")
    if not 0 <= pid <= MAX_PID or len(pidns) > 256:
        raise ProtocolError(f"HELLO: pid must be in [0, {MAX_PID}] and pidns at most 256 characters, "
                            f"got {pid!r:.40}, {pidns[:64]!r}")
    job = obj.get("job")
    if job is not None and (not isinstance(job, str) or not 0 < len(job) <= MAX_JOB_CHARS):
        raise ProtocolError(f"HELLO: job must be a string of 1 to {MAX_JOB_CHARS} characters, got {job!r:.80}")
    shard = json_field(obj, "shard", list, "HELLO")
    if (len(shard) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1] <= MAX_SHARDS):
        raise ProtocolError(f"HELLO: shard must be [i, n] with 0 <= i < n <= {MAX_SHARDS}, got {shard!r:.80}")
    return HelloMsg(start[0], start[1], credit, pid, pidns, job, (shard[0], shard[1]))


def mode(name: str, proof: bytes | None = None) -> list[bytes]:
    return [MODE, name.encode()] + ([] if name == "frames" else [proof])


def parse_mode(frames: list) -> tuple[str, bytes | None]:
    """("frames", None): batch bytes in the message; ("shm", proof): descriptors in BATCHES
    messages; ("mailbox", proof): descriptors in the shared-memory mailbox."""
    value = bytes(memoryview(frames[1])) if len(frames) > 1 else b""
    if value not in MODES:
        raise ProtocolError(f"MODE: expected one of {MODES}, got {value[:32]!r}")
    if value == b"frames":
        _expect_frames(frames, 2, "MODE frames")
        return "frames", None
    _expect_frames(frames, 3, f"MODE {value.decode()}")
    proof = bytes(memoryview(frames[2]))
    if len(proof) != PROOF_BYTES:
        raise ProtocolError(f"MODE {value.decode()}: proof of {len(proof)} bytes, expected {PROOF_BYTES}")
    return value.decode(), proof


def ack(credit: int, releases: list[int]) -> list[bytes]:
    return [ACK, _U32.pack(credit) + struct.pack(f"<{len(releases)}I", *releases)]


def parse_ack(frames: list) -> tuple[int, tuple[int, ...]]:
    _expect_frames(frames, 2, "ACK")
    buf = memoryview(frames[1])
    if buf.nbytes < 4 or buf.nbytes % 4 or buf.nbytes > 4 * (MAX_RELEASES_PER_ACK + 1):
        raise ProtocolError(f"ACK: payload must be 4*(1+n) bytes with n <= {MAX_RELEASES_PER_ACK}, "
                            f"got {buf.nbytes} bytes")
    values = struct.unpack(f"<{buf.nbytes // 4}I", buf)
    return values[0], values[1:]


# -- broker -> client ---------------------------------------------------------

def batch(msg: BatchMsg) -> list[bytes]:
    return [BATCH, _BATCH.pack(msg.slot, msg.flags, msg.epoch, msg.index, msg.seq)]


def batches(msgs: list[BatchMsg]) -> list[bytes]:
    return [BATCHES, b"".join(_BATCH.pack(m.slot, m.flags, m.epoch, m.index, m.seq) for m in msgs)]


def parse_batches(frames: list) -> list[BatchMsg]:
    _expect_frames(frames, 2, "BATCHES")
    buf = memoryview(frames[1])
    count, rest = divmod(buf.nbytes, _BATCH.size)
    if rest or not 1 <= count <= MAX_BATCHES_PER_MESSAGE:
        raise ProtocolError(f"BATCHES: expected 1 to {MAX_BATCHES_PER_MESSAGE} records of {_BATCH.size} bytes, "
                            f"got {buf.nbytes} bytes")
    return [BatchMsg(*fields) for fields in _BATCH.iter_unpack(buf)]


def parse_batch(frames: list) -> BatchMsg:
    _expect_frames(frames, 4, "BATCH")
    return BatchMsg(*_unpack(_BATCH, frames[1], "BATCH"))


def error(kind: str, message: str, **details) -> list[bytes]:
    body = {"kind": kind, "message": message[:8192]}
    body.update({k: v for k, v in details.items() if v is not None})
    if "traceback" in body:
        body["traceback"] = str(body["traceback"])[-32768:]
    return [ERROR, encode_json(body)]


def parse_error(frames: list) -> dict:
    _expect_frames(frames, 2, "ERROR")
    obj = decode_json(frames[1], "ERROR")
    json_field(obj, "kind", str, "ERROR")
    json_field(obj, "message", str, "ERROR")
    return obj


# -- worker <-> broker --------------------------------------------------------

def _unpack_records(fmt: struct.Struct, frames: list, what: str) -> list[tuple]:
    _expect_frames(frames, 2, what)
    buf = memoryview(frames[1])
    count, rest = divmod(buf.nbytes, fmt.size)
    if rest or not 1 <= count <= MAX_TASKS_PER_MESSAGE:
        raise ProtocolError(f"{what}: expected 1 to {MAX_TASKS_PER_MESSAGE} records of {fmt.size} bytes, "
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
    return [W_ERROR, _SLOT.pack(slot), encode_json(details)]


def parse_worker_error(frames: list) -> tuple[int, dict]:
    _expect_frames(frames, 3, "W_ERROR")
    slot = _unpack(_SLOT, frames[1], "W_ERROR")[0]
    obj = decode_json(frames[2], "W_ERROR")
    json_field(obj, "kind", str, "W_ERROR")
    json_field(obj, "message", str, "W_ERROR")
    return slot, obj


def worker_hello(worker: int, pid: int) -> list[bytes]:
    return [W_HELLO, encode_json({"worker": worker, "pid": pid})]


def parse_worker_hello(frames: list) -> tuple[int, int]:
    _expect_frames(frames, 2, "W_HELLO")
    obj = decode_json(frames[1], "W_HELLO")
    return json_field(obj, "worker", int, "W_HELLO"), json_field(obj, "pid", int, "W_HELLO")
