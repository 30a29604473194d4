import json
import mmap
import os
import secrets
import struct
import uuid

import numpy as np
import pytest

from ringfeed import protocol
from ringfeed.layout import RingLayout
from ringfeed.leases import RingMapping, copy_arrays, frame_arrays, lease_arrays
from ringfeed.layout import mailbox_bytes
from ringfeed.paths import SHM_DIR, pid_namespace_id
from ringfeed.protocol import BatchMsg, ProtocolError
from ringfeed.server import worker_protocol
from ringfeed.server.worker_protocol import TaskMsg
from ringfeed.structure import Structure


def test_round_trips():
    msg = BatchMsg(slot=3, flags=protocol.FLAG_COPY, epoch=2, index=7, seq=123)
    assert protocol.parse_batch([*protocol.batch(msg), b"x", b"y"], fields=2) == msg
    assert protocol.parse_batch([*protocol.batch(msg), b"a", b"b", b"c", b"d"], fields=4) == msg
    assert protocol.parse_batches(protocol.batches([msg, msg])) == [msg, msg]
    tasks = [TaskMsg(slot=1, epoch=4, index=5), TaskMsg(slot=2, epoch=4, index=6)]
    assert worker_protocol.parse_tasks(worker_protocol.tasks(tasks)) == tasks
    assert protocol.parse_ack(protocol.ack(2, [1, 5, 9])) == (2, (1, 5, 9))
    hello = protocol.parse_hello(protocol.hello(1, 2, 4, 99, "pid:[1]"))
    assert (hello.epoch, hello.index, hello.credit, hello.pid, hello.pidns) == (1, 2, 4, 99, "pid:[1]")
    assert worker_protocol.parse_worker_done(worker_protocol.worker_done([(6, 1), (7, 0)])) == [(6, 1), (7, 0)]
    assert protocol.parse_mode(protocol.mode("mailbox", b"p" * 16)) == ("mailbox", b"p" * 16)
    assert protocol.parse_mode(protocol.mode("frames")) == ("frames", None)
    slot, details = worker_protocol.parse_worker_error(worker_protocol.worker_error(2, {"kind": "ValueError", "message": "x"}))
    assert slot == 2 and details["kind"] == "ValueError"


@pytest.mark.parametrize("frames, fragment", [
    ([protocol.BATCH, b"\x00" * 7, b"", b""], "expected a 32-byte record, got 7"),
    ([protocol.BATCH], "expected 4 frame(s), got 1"),
    ([protocol.BATCH, b"\x00" * 32, b"", b"", b""], "BATCH: expected 4 frame(s), got 5"),
    ([protocol.BATCHES, b"\x00" * 33], "expected 1 to 4096 records of 32 bytes, got 33 bytes"),
    ([protocol.BATCHES, b""], "got 0 bytes"),
    ([worker_protocol.TASK, b"\x00" * 21], "expected 1 to 64 records of 20 bytes, got 21 bytes"),
    ([worker_protocol.TASK, b"\x00" * 20 * 65], "expected 1 to 64 records"),
    ([worker_protocol.W_DONE, b""], "expected 1 to 64 records of 8 bytes, got 0 bytes"),
    ([protocol.MODE, b"smh"], "MODE: expected one of"),
    ([protocol.ACK, b"\x00\x00"], "4*(1+n) bytes"),
    ([protocol.ACK, b"\x00" * 4 * 5000], "n <= 4096"),
    ([protocol.HELLO, b"\xff\xfe"], "not UTF-8 JSON"),
    ([protocol.HELLO, b"[1, 2]"], "expected a JSON object, got list"),
    ([protocol.HELLO, b'{"version": 4, "start": [0, -1], "credit": 1, "pid": 1, "pidns": ""}'], "'start'"),
    ([protocol.HELLO, b'{"version": 9, "start": [0, 0], "credit": 1, "pid": 1, "pidns": ""}'], "version 9"),
    ([protocol.HELLO, b'{"version": 4, "start": [0, 0], "credit": true, "pid": 1, "pidns": ""}'], "got bool"),
    ([protocol.HELLO, b'{"version": 4, "start": [0, 0], "credit": 0, "pid": 1, "pidns": ""}'], "credit"),
    ([protocol.HELLO, b"{" + b" " * (protocol.MAX_JSON_BYTES + 1) + b"}"], "exceeds"),
    ([protocol.HELLO, b'{"version": 4, "start": [9223372036854775808, 0], "credit": 1, "pid": 1, "pidns": ""}'],
     "'start' must be [epoch, index] of ints in [0, 2147483647]"),
    ([protocol.HELLO, b'{"a":' * 5000 + b"1" + b"}" * 5000], "nested too deeply"),
    ([protocol.HELLO, b'{"version": 4, "start": [0, 0], "credit": 1, "pid": 4294967296, "pidns": ""}'],
     "pid must be in"),
    ([protocol.MODE, b"shm"], "MODE shm: expected 3 frame(s), got 2"),
    ([protocol.MODE, b"mailbox", b"short"], "proof of 5 bytes, expected 16"),
    ([protocol.MODE, b"frames", b"x" * 16], "MODE frames: expected 2 frame(s), got 3"),
])
def test_malformed_frames_are_refused_with_a_reason(frames, fragment):
    parser = {protocol.BATCH: lambda frames: protocol.parse_batch(frames, fields=2),
              protocol.BATCHES: protocol.parse_batches, protocol.ACK: protocol.parse_ack,
              protocol.HELLO: protocol.parse_hello, worker_protocol.TASK: worker_protocol.parse_tasks,
              worker_protocol.W_DONE: worker_protocol.parse_worker_done, protocol.MODE: protocol.parse_mode}[frames[0]]
    with pytest.raises(ProtocolError) as err:
        parser(frames)
    assert fragment in str(err.value)


def test_records_are_little_endian_fixed_size():
    frames = protocol.batch(BatchMsg(1, 0, 2, 3, 4))
    assert struct.unpack("<IIqqQ", frames[1]) == (1, 0, 2, 3, 4)


# -- a slot of named fields ---------------------------------------------------------

FIELDS = [("image", (4, 2, 2), "|u1"), ("meta", (4, 3), "<f4"), ("cls", (4,), "<i8"), ("box", (4, 4), "<f4"),
          ("w", (4,), "<f4")]
STRUCTURE = Structure(inputs=["image", "meta"], targets=["cls", "box"], sample_weight="w")


def _layout(slots: int = 2) -> RingLayout:
    segment = f"ringfeed-{pid_namespace_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-ring"
    header = mmap.PAGESIZE + mailbox_bytes(slots)
    header += -header % mmap.PAGESIZE
    return RingLayout.plan(segment, secrets.token_bytes(16), slots, FIELDS, header, 1, mmap.PAGESIZE)


def _welcome(layout: RingLayout, structure: Structure) -> list[bytes]:
    return [protocol.WELCOME, json.dumps({
        "layout": layout.to_json(), "structure": structure.to_json(), "batch_size": 4, "steps_per_epoch": 3,
        "samples": 12, "heartbeat_s": 1.0, "ordered": True, "server_pid": 1, "credit": 1}).encode()]


def _batch_values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.random(shape) * 100).astype(dtype) for name, shape, dtype in FIELDS}


def test_a_welcome_of_named_fields_is_parsed_into_its_layout_and_structure():
    layout = _layout()
    welcome = protocol.parse_welcome(_welcome(layout, STRUCTURE), requested_credit=1)
    assert welcome.layout == layout and welcome.structure == STRUCTURE
    assert [field.offset % 64 for field in welcome.layout.fields] == [0] * len(FIELDS)


def test_a_structure_must_use_every_field_of_the_slot():
    with pytest.raises(ProtocolError, match="WELCOME structure: layout field 'box' is in every slot"):
        protocol.parse_welcome(_welcome(_layout(), Structure(["image", "meta"], "cls", "w")), 1)


def test_batch_frames_become_the_structure():
    layout, values = _layout(), _batch_values(0)
    x, y, w = STRUCTURE.assemble(frame_arrays(layout, [values[name].tobytes() for name in layout.names]))
    assert list(x) == ["image", "meta"] and list(y) == ["cls", "box"]
    for name, array in [*x.items(), *y.items(), ("w", w)]:
        np.testing.assert_array_equal(array, values[name])
        assert array.dtype == values[name].dtype


def test_a_batch_frame_of_the_wrong_size_is_refused_naming_its_field():
    layout, values = _layout(), _batch_values(0)
    frames = [values[name].tobytes() for name in layout.names]
    frames[3] = frames[3][:-4]
    with pytest.raises(ProtocolError, match=r"field 'box' is 60 bytes, expected 64 for \(4, 4\) float32"):
        frame_arrays(layout, frames)
    with pytest.raises(ProtocolError, match="4 array frames, expected one for each of the 5 fields"):
        frame_arrays(layout, frames[:4])


@pytest.fixture
def mapping():
    """A ring segment of ``_layout()``: its token, then slot 1 holding batch ``_batch_values(1)``."""
    layout = _layout()
    segment = bytearray(layout.nbytes)
    segment[:16] = layout.token
    for field in layout.fields:
        start = layout.slot_start(1) + field.offset
        segment[start:start + field.nbytes] = _batch_values(1)[field.name].tobytes()
    path = SHM_DIR / layout.segment
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(segment)
    try:
        yield RingMapping(layout)
    finally:
        path.unlink()


def test_every_array_of_a_slot_holds_its_one_lease(mapping):
    released = []
    arrays = lease_arrays(mapping, 1, released)
    assert {name: array.tolist() for name, array in arrays.items()} == \
        {name: array.tolist() for name, array in _batch_values(1).items()}
    x, y, w = STRUCTURE.assemble(arrays)
    del arrays, x, y
    view = w[1:]
    del w
    assert released == []  # a view of the last field still aliases the slot
    del view
    assert released == [1]


def test_copied_arrays_are_their_own(mapping):
    arrays = copy_arrays(mapping, 1)
    assert list(arrays) == [name for name, _, _ in FIELDS]
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, _batch_values(1)[name])
        assert array.flags.owndata
