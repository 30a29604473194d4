"""The ringfeed wire protocol: commands, frame builders and strict parsers.

Every message is a ZeroMQ multipart message ``[command, payload?]``. Fixed
records are packed little-endian with ``struct``; variable records are UTF-8
JSON objects of at most ``MAX_JSON_BYTES``. Nothing is ever unpickled or
evaluated: every parser checks frame count, size and types, and raises
``ProtocolError`` naming what it got and what it expected.

Client <-> broker (the client's DEALER talks to the broker's ROUTER)::

    HELLO  {version, start: [epoch, index], credit, pid, pidns, job?, shard?: [i, n]}
                                                      -> WELCOME {layout, structure, batch_size,
                                                                  steps_per_epoch, samples, heartbeat_s,
                                                                  ordered, server_pid, credit (granted),
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
    BATCH  <slot:u32 flags:u32 epoch:i64 index:i64 seq:u64> field-bytes+
                                                      (broker -> client, "frames" mode: one frame
                                                       per layout field, in layout order)
    BATCHES <slot:u32 flags:u32 epoch:i64 index:i64 seq:u64>+   (broker -> client, "shm" mode:
                                                       every batch that became ready at once)
    WAKE                                              ("mailbox" mode: records are waiting in the
                                                       shared-memory mailbox named in WELCOME;
                                                       see client/mailbox.py)
    ERROR  {kind, message, traceback?, epoch?, index?, sample?} (broker -> client; kind
                                                       "Expired": the server dropped this client,
                                                       which may say HELLO again from where it is)

The broker's messages to its workers are the server's own
(``loader_server/worker_protocol.py``), built on this module's framing.

WELCOME's ``layout`` is the ring segment's (``client/layout.py``)::

    {segment, token, header, slots, slot_bytes,
     fields: [{name, offset, shape: [batch_size, ...], dtype}]+,   (the arrays of a slot)
     mailboxes, mailbox_offset, mailbox_capacity}

and its ``structure`` says which fields make up what the trainer receives,
``(x, y)`` or ``(x, y, w)`` (``client/structure.py``)::

    {inputs: name | [name+], targets: name | [name+], sample_weight: name | null}

The structure uses every field of the layout, and only those.

The client trusts a server no more than the server trusts it: ``parse_welcome``
checks every WELCOME field the client uses (the ring segment's name, its token,
every field's name, offset, shape and dtype, the structure, the mailbox and
the credit) before anything is opened, mapped or written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .layout import BATCH_RECORD, TOKEN_BYTES, LayoutError, RingLayout
from .structure import Structure, StructureError

PROTOCOL_VERSION = 4  # 4: a slot holds named fields, WELCOME a structure, BATCH a frame per field
MAX_JSON_BYTES = 64 * 1024
MAX_POSITION = 2**31 - 1  # epochs and batch indices; epoch * batches per epoch stays in an i64
MAX_PID = 2**31 - 1
MAX_RELEASES_PER_ACK = 4096

HELLO = b"HELLO"
WELCOME = b"WELCOME"
MODE = b"MODE"
MODES = (b"shm", b"frames", b"mailbox")
PROOF_OFFSET, PROOF_BYTES = TOKEN_BYTES, 16  # after the ring's token, a secret that only a mapping can read
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

FLAG_COPY = 1  # the client must copy the batch out and release the slot at once
FLAG_ERROR = 2  # "mailbox" mode: this batch failed; its ERROR message is on the socket

_U32 = struct.Struct("<I")

# WELCOME limits (the layout's are in client/layout.py): generous, and arithmetic on them stays sane.
MAX_BATCH_SIZE = 1 << 24
MAX_COUNT = 1 << 48  # steps_per_epoch, samples
MAX_HEARTBEAT_S = 3600.0


class ProtocolError(ValueError):
    """A frame that does not follow the protocol."""


class BatchMsg(NamedTuple):
    slot: int
    flags: int
    epoch: int
    index: int
    seq: int


def expect_frames(frames: list, count: int, what: str) -> None:
    if len(frames) != count:
        raise ProtocolError(f"{what}: expected {count} frame(s), got {len(frames)}")


def unpack(fmt: struct.Struct, frame, what: str) -> tuple:
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
    expected = " or ".join(k.__name__ for k in kinds)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"{what}: field {key!r} must be {expected}, got bool")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{what}: field {key!r} must be {expected}, got {type(value).__name__}")
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
    expect_frames(frames, 2, "HELLO")
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
        expect_frames(frames, 2, "MODE frames")
        return "frames", None
    expect_frames(frames, 3, f"MODE {value.decode()}")
    proof = bytes(memoryview(frames[2]))
    if len(proof) != PROOF_BYTES:
        raise ProtocolError(f"MODE {value.decode()}: proof of {len(proof)} bytes, expected {PROOF_BYTES}")
    return value.decode(), proof


def ack(credit: int, releases: list[int]) -> list[bytes]:
    return [ACK, _U32.pack(credit) + struct.pack(f"<{len(releases)}I", *releases)]


def parse_ack(frames: list) -> tuple[int, tuple[int, ...]]:
    expect_frames(frames, 2, "ACK")
    buf = memoryview(frames[1])
    if buf.nbytes < 4 or buf.nbytes % 4 or buf.nbytes > 4 * (MAX_RELEASES_PER_ACK + 1):
        raise ProtocolError(f"ACK: payload must be 4*(1+n) bytes with n <= {MAX_RELEASES_PER_ACK}, "
                            f"got {buf.nbytes} bytes")
    values = struct.unpack(f"<{buf.nbytes // 4}I", buf)
    return values[0], values[1:]


# -- broker -> client ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WelcomeMsg:
    layout: RingLayout
    structure: Structure
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


def _layout(obj: dict, batch_size: int) -> RingLayout:
    try:
        return RingLayout.parse(obj, batch_size)
    except LayoutError as exc:
        raise ProtocolError(f"WELCOME layout: {exc}") from None


def _structure(obj: dict, layout: RingLayout) -> Structure:
    """The structure WELCOME states, using every field of ``layout`` and only those."""
    try:
        structure = Structure.parse(obj)
        structure.check_fields(layout.names)
    except StructureError as exc:
        raise ProtocolError(f"WELCOME structure: {exc}") from None
    for name in layout.names:
        if name not in structure.names:
            raise ProtocolError(f"WELCOME structure: layout field {name!r} is in every slot but in none of "
                                f"inputs, targets and sample_weight ({structure.to_json()})")
    return structure


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
    expect_frames(frames, 2, "WELCOME")
    obj = decode_json(frames[1], "WELCOME")
    batch_size = _int_field(obj, "batch_size", 1, MAX_BATCH_SIZE, "WELCOME")
    layout = _layout(json_field(obj, "layout", dict, "WELCOME"), batch_size)
    structure = _structure(json_field(obj, "structure", dict, "WELCOME"), layout)
    heartbeat_s = json_field(obj, "heartbeat_s", (int, float), "WELCOME")
    if not 0 < heartbeat_s <= MAX_HEARTBEAT_S:
        raise ProtocolError(f"WELCOME: field 'heartbeat_s' must be in (0, {MAX_HEARTBEAT_S}], got {heartbeat_s}")
    return WelcomeMsg(
        layout=layout, structure=structure, batch_size=batch_size,
        steps_per_epoch=_int_field(obj, "steps_per_epoch", 1, MAX_COUNT, "WELCOME"),
        samples=_int_field(obj, "samples", 1, MAX_COUNT, "WELCOME"), heartbeat_s=float(heartbeat_s),
        credit=_int_field(obj, "credit", 1, requested_credit, "WELCOME"),
        ordered=json_field(obj, "ordered", bool, "WELCOME"),
        server_pid=_int_field(obj, "server_pid", 1, MAX_PID, "WELCOME"),
        mailbox=_mailbox_field(obj, layout.mailboxes))


def batch(msg: BatchMsg) -> list[bytes]:
    return [BATCH, BATCH_RECORD.pack(msg.slot, msg.flags, msg.epoch, msg.index, msg.seq)]


def batches(msgs: list[BatchMsg]) -> list[bytes]:
    return [BATCHES, b"".join(BATCH_RECORD.pack(m.slot, m.flags, m.epoch, m.index, m.seq) for m in msgs)]


def parse_batches(frames: list) -> list[BatchMsg]:
    expect_frames(frames, 2, "BATCHES")
    buf = memoryview(frames[1])
    count, rest = divmod(buf.nbytes, BATCH_RECORD.size)
    if rest or not 1 <= count <= MAX_BATCHES_PER_MESSAGE:
        raise ProtocolError(f"BATCHES: expected 1 to {MAX_BATCHES_PER_MESSAGE} records of "
                            f"{BATCH_RECORD.size} bytes, got {buf.nbytes} bytes")
    return [BatchMsg(*fields) for fields in BATCH_RECORD.iter_unpack(buf)]


def parse_batch(frames: list, fields: int) -> BatchMsg:
    """BATCH in "frames" mode: its record, then one frame for each of the layout's ``fields``."""
    expect_frames(frames, 2 + fields, "BATCH")
    return BatchMsg(*unpack(BATCH_RECORD, frames[1], "BATCH"))


def error(kind: str, message: str, **details) -> list[bytes]:
    body = {"kind": kind, "message": message[:8192]}
    body.update({k: v for k, v in details.items() if v is not None})
    if "traceback" in body:
        body["traceback"] = str(body["traceback"])[-32768:]
    return [ERROR, encode_json(body)]


def parse_error(frames: list) -> dict:
    expect_frames(frames, 2, "ERROR")
    obj = decode_json(frames[1], "ERROR")
    json_field(obj, "kind", str, "ERROR")
    json_field(obj, "message", str, "ERROR")
    return obj
