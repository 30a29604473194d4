"""The ringfeed wire protocol: commands, frame builders and strict parsers.

Every message is a ZeroMQ multipart message ``[command, payload?]``. Fixed
records are packed little-endian with ``struct``; variable records are UTF-8
JSON objects of at most ``MAX_JSON_BYTES``. Nothing is ever unpickled or
evaluated: every parser checks frame count, size and types, and raises
``ProtocolError`` naming what it got and what it expected.

Client <-> broker (the client's DEALER talks to the broker's ROUTER)::

    HELLO  {version, start: [epoch, index], credit, pid, pidns, job?, shard?: [i, n]}
                                                      -> WELCOME {layout, batch_size, steps_per_epoch,
                                                                  samples, heartbeat_s, ordered,
                                                                  server_pid, credit (granted),
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

The client trusts a server no more than the server trusts it: ``parse_welcome``
checks every WELCOME field the client uses (the ring segment's name, its token,
every offset, size, shape and dtype of the layout, the mailbox and the credit)
before anything is opened, mapped or written.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass

from .paths import SEGMENT_NAME

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

# WELCOME limits: generous for any real ring, small enough that arithmetic on them stays sane.
TOKEN_BYTES = 16  # the ring token at the start of the segment (loader_server/ring.py)
_TOKEN_HEX = re.compile(r"[0-9a-f]{32}")
ALIGN = 64  # slots and their arrays start on 64-byte boundaries
MAX_SLOTS = 1 << 16
MAX_SEGMENT_BYTES = 1 << 46
MAX_NDIM = 8
MAX_BATCH_SIZE = 1 << 24
MAX_COUNT = 1 << 48  # steps_per_epoch, samples
MAX_MAILBOXES = 1024
MAX_HEARTBEAT_S = 3600.0
MAX_PID = (1 << 31) - 1
# Plain numeric dtypes, spelled as numpy's ``dtype.str``: nothing with objects, fields or strings.
DTYPE_SIZES = {f"{order}{kind}{size}": size
               for kind, sizes in (("b", (1,)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)),
                                   ("f", (2, 4, 8)), ("c", (8, 16)))
               for size in sizes for order in (("|",) if size == 1 else ("<", ">"))}


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
    except RecursionError:
        raise ProtocolError(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, or ints past Python's digit limit
        raise ProtocolError(f"{what}: payload is not UTF-8 JSON that Python can read ({exc})") from None
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

@dataclass(frozen=True, slots=True)
class RingLayout:
    """The ring segment's layout as WELCOME states it (``Layout`` in loader_server/ring.py), checked."""
    segment: str  # a name in /dev/shm matching ``paths.SEGMENT_NAME``
    token: bytes  # TOKEN_BYTES that the segment starts with
    header: int
    slots: int
    slot_bytes: int
    x_offset: int  # within each slot
    x_shape: tuple[int, ...]
    x_dtype: str
    y_offset: int
    y_shape: tuple[int, ...]
    y_dtype: str
    mailboxes: int
    mailbox_offset: int  # of mailbox 0, within the header
    mailbox_capacity: int

    @property
    def nbytes(self) -> int:
        return self.header + self.slots * self.slot_bytes


@dataclass(frozen=True, slots=True)
class WelcomeMsg:
    layout: RingLayout
    batch_size: int
    steps_per_epoch: int
    samples: int
    heartbeat_s: float
    credit: int  # granted: at most what HELLO asked for
    ordered: bool
    server_pid: int
    mailbox: tuple[int, int] | None  # (k, token) of the mailbox offered to this client


def _int_field(obj: dict, key: str, low: int, high: int, what: str) -> int:
    value = json_field(obj, key, int, what)
    if not low <= value <= high:
        raise ProtocolError(f"{what}: field {key!r} must be in [{low}, {high}], got {value}")
    return value


def _aligned_field(obj: dict, key: str, low: int, what: str) -> int:
    value = _int_field(obj, key, low, MAX_SEGMENT_BYTES, what)
    if value % ALIGN:
        raise ProtocolError(f"{what}: field {key!r} must be a multiple of {ALIGN}, got {value}")
    return value


def _shape_field(obj: dict, key: str, batch_size: int, what: str) -> tuple[int, ...]:
    shape = json_field(obj, key, list, what)
    if (not 1 <= len(shape) <= MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SEGMENT_BYTES
                       for n in shape)):
        raise ProtocolError(f"{what}: field {key!r} must be 1 to {MAX_NDIM} non-negative ints, "
                            f"got {shape!r:.80}")
    if shape[0] != batch_size:
        raise ProtocolError(f"{what}: field {key!r} must start with batch_size {batch_size}, got {shape!r:.80}")
    return tuple(shape)


def _dtype_field(obj: dict, key: str, what: str) -> str:
    dtype = json_field(obj, key, str, what)
    if dtype not in DTYPE_SIZES:
        raise ProtocolError(f"{what}: field {key!r} must be a bool, int, uint, float or complex dtype "
                            f"as numpy spells it ('<f4', '|u1', ...), got {dtype!r:.40}")
    return dtype


def _segment_field(obj: dict, what: str) -> str:
    segment = json_field(obj, "segment", str, what)
    match = SEGMENT_NAME.fullmatch(segment)
    if match is None or match.group(4) != "ring":
        raise ProtocolError(f"{what}: field 'segment' must be a ring segment name matching "
                            f"{SEGMENT_NAME.pattern} and ending in '-ring', got {segment!r:.80}")
    return segment


def _token_field(obj: dict, what: str) -> bytes:
    token = json_field(obj, "token", str, what)
    if not _TOKEN_HEX.fullmatch(token):
        raise ProtocolError(f"{what}: field 'token' must be {2 * TOKEN_BYTES} lowercase hex digits, "
                            f"got {token!r:.80}")
    return bytes.fromhex(token)


def _check_regions(layout: RingLayout, what: str) -> None:
    """Each array inside a slot, the two apart, the mailboxes between the token and the slots."""
    x = (layout.x_offset, layout.x_offset + math.prod(layout.x_shape) * DTYPE_SIZES[layout.x_dtype])
    y = (layout.y_offset, layout.y_offset + math.prod(layout.y_shape) * DTYPE_SIZES[layout.y_dtype])
    for key, (start, end) in (("x_offset", x), ("y_offset", y)):
        if end > layout.slot_bytes:
            raise ProtocolError(f"{what}: field {key!r}: the array [{start}, {end}) does not fit in "
                                f"slot_bytes {layout.slot_bytes}")
    both_hold_bytes = x[0] < x[1] and y[0] < y[1]
    if both_hold_bytes and x[0] < y[1] and y[0] < x[1]:
        raise ProtocolError(f"{what}: fields 'x_offset' and 'y_offset': x [{x[0]}, {x[1]}) and "
                            f"y [{y[0]}, {y[1]}) overlap")
    from .mailbox import mailbox_bytes  # here: client/mailbox.py imports this module

    mailboxes_end = layout.mailbox_offset + layout.mailboxes * mailbox_bytes(layout.mailbox_capacity)
    if mailboxes_end > layout.header:
        raise ProtocolError(f"{what}: field 'mailbox_offset': {layout.mailboxes} mailboxes from byte "
                            f"{layout.mailbox_offset} end at byte {mailboxes_end}, beyond the header's "
                            f"{layout.header} bytes")
    if layout.nbytes > MAX_SEGMENT_BYTES:
        raise ProtocolError(f"{what}: the ring of {layout.slots} slots of {layout.slot_bytes} bytes after "
                            f"a {layout.header}-byte header exceeds {MAX_SEGMENT_BYTES} bytes")


def _parse_layout(obj: dict, batch_size: int) -> RingLayout:
    what = "WELCOME layout"
    slots = _int_field(obj, "slots", 1, MAX_SLOTS, what)
    capacity = json_field(obj, "mailbox_capacity", int, what)
    if capacity != slots:
        raise ProtocolError(f"{what}: field 'mailbox_capacity' must equal slots ({slots}), got {capacity}")
    layout = RingLayout(
        segment=_segment_field(obj, what), token=_token_field(obj, what),
        header=_aligned_field(obj, "header", ALIGN, what), slots=slots,
        slot_bytes=_aligned_field(obj, "slot_bytes", ALIGN, what),
        x_offset=_aligned_field(obj, "x_offset", 0, what), x_shape=_shape_field(obj, "x_shape", batch_size, what),
        x_dtype=_dtype_field(obj, "x_dtype", what),
        y_offset=_aligned_field(obj, "y_offset", 0, what), y_shape=_shape_field(obj, "y_shape", batch_size, what),
        y_dtype=_dtype_field(obj, "y_dtype", what),
        mailboxes=_int_field(obj, "mailboxes", 0, MAX_MAILBOXES, what),
        mailbox_offset=_aligned_field(obj, "mailbox_offset", TOKEN_BYTES, what), mailbox_capacity=capacity)
    _check_regions(layout, what)
    return layout


def _mailbox_field(obj: dict, mailboxes: int) -> tuple[int, int] | None:
    if "mailbox" not in obj:
        return None
    offer = json_field(obj, "mailbox", list, "WELCOME")
    if (len(offer) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in offer)
            or not 0 <= offer[0] < mailboxes or not 1 <= offer[1] < 1 << 63):
        raise ProtocolError(f"WELCOME: field 'mailbox' must be [k, token] with 0 <= k < {mailboxes} "
                            f"and 1 <= token < 2**63, got {offer!r:.80}")
    return offer[0], offer[1]


def parse_welcome(frames: list, requested_credit: int) -> WelcomeMsg:
    """WELCOME, checked field by field; ``requested_credit`` is what this client's HELLO asked for."""
    _expect_frames(frames, 2, "WELCOME")
    obj = decode_json(frames[1], "WELCOME")
    batch_size = _int_field(obj, "batch_size", 1, MAX_BATCH_SIZE, "WELCOME")
    layout = _parse_layout(json_field(obj, "layout", dict, "WELCOME"), batch_size)
    heartbeat_s = json_field(obj, "heartbeat_s", (int, float), "WELCOME")
    if not 0 < heartbeat_s <= MAX_HEARTBEAT_S:
        raise ProtocolError(f"WELCOME: field 'heartbeat_s' must be in (0, {MAX_HEARTBEAT_S}], got {heartbeat_s}")
    return WelcomeMsg(
        layout=layout, batch_size=batch_size,
        steps_per_epoch=_int_field(obj, "steps_per_epoch", 1, MAX_COUNT, "WELCOME"),
        samples=_int_field(obj, "samples", 1, MAX_COUNT, "WELCOME"), heartbeat_s=float(heartbeat_s),
        credit=_int_field(obj, "credit", 1, requested_credit, "WELCOME"),
        ordered=json_field(obj, "ordered", bool, "WELCOME"),
        server_pid=_int_field(obj, "server_pid", 1, MAX_PID, "WELCOME"),
        mailbox=_mailbox_field(obj, layout.mailboxes))

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
