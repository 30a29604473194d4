import struct

import pytest

from client import protocol
from client.protocol import BatchMsg, ProtocolError, TaskMsg


def test_round_trips():
    msg = BatchMsg(slot=3, flags=protocol.FLAG_COPY, epoch=2, index=7, seq=123)
    assert protocol.parse_batch([*protocol.batch(msg), b"x", b"y"]) == msg
    assert protocol.parse_batches(protocol.batches([msg, msg])) == [msg, msg]
    tasks = [TaskMsg(slot=1, epoch=4, index=5), TaskMsg(slot=2, epoch=4, index=6)]
    assert protocol.parse_tasks(protocol.tasks(tasks)) == tasks
    assert protocol.parse_ack(protocol.ack(2, [1, 5, 9])) == (2, (1, 5, 9))
    hello = protocol.parse_hello(protocol.hello(1, 2, 4, 99, "pid:[1]"))
    assert (hello.epoch, hello.index, hello.credit, hello.pid, hello.pidns) == (1, 2, 4, 99, "pid:[1]")
    assert protocol.parse_worker_done(protocol.worker_done([(6, 1), (7, 0)])) == [(6, 1), (7, 0)]
    assert protocol.parse_mode(protocol.mode("mailbox", b"p" * 16)) == ("mailbox", b"p" * 16)
    assert protocol.parse_mode(protocol.mode("frames")) == ("frames", None)
    slot, details = protocol.parse_worker_error(protocol.worker_error(2, {"kind": "ValueError", "message": "x"}))
    assert slot == 2 and details["kind"] == "ValueError"


@pytest.mark.parametrize("frames, fragment", [
    ([protocol.BATCH, b"\x00" * 7, b"", b""], "expected a 32-byte record, got 7"),
    ([protocol.BATCH], "expected 4 frame(s), got 1"),
    ([protocol.BATCHES, b"\x00" * 33], "expected 1 to 4096 records of 32 bytes, got 33 bytes"),
    ([protocol.BATCHES, b""], "got 0 bytes"),
    ([protocol.TASK, b"\x00" * 21], "expected 1 to 64 records of 20 bytes, got 21 bytes"),
    ([protocol.TASK, b"\x00" * 20 * 65], "expected 1 to 64 records"),
    ([protocol.W_DONE, b""], "expected 1 to 64 records of 8 bytes, got 0 bytes"),
    ([protocol.MODE, b"smh"], "MODE: expected one of"),
    ([protocol.ACK, b"\x00\x00"], "4*(1+n) bytes"),
    ([protocol.ACK, b"\x00" * 4 * 5000], "n <= 4096"),
    ([protocol.HELLO, b"\xff\xfe"], "not UTF-8 JSON"),
    ([protocol.HELLO, b"[1, 2]"], "expected a JSON object, got list"),
    ([protocol.HELLO, b'{"version": 3, "start": [0, -1], "credit": 1, "pid": 1, "pidns": ""}'], "'start'"),
    ([protocol.HELLO, b'{"version": 9, "start": [0, 0], "credit": 1, "pid": 1, "pidns": ""}'], "version 9"),
    ([protocol.HELLO, b'{"version": 3, "start": [0, 0], "credit": true, "pid": 1, "pidns": ""}'], "got bool"),
    ([protocol.HELLO, b'{"version": 3, "start": [0, 0], "credit": 0, "pid": 1, "pidns": ""}'], "credit"),
    ([protocol.HELLO, b"{" + b" " * (protocol.MAX_JSON_BYTES + 1) + b"}"], "exceeds"),
    ([protocol.HELLO, b'{"version": 3, "start": [9223372036854775808, 0], "credit": 1, "pid": 1, "pidns": ""}'],
     "'start' must be [epoch, index] of ints in [0, 2147483647]"),
    ([protocol.HELLO, b'{"a":' * 5000 + b"1" + b"}" * 5000], "nested too deeply"),
    ([protocol.HELLO, b'{"version": 3, "start": [0, 0], "credit": 1, "pid": 4294967296, "pidns": ""}'],
     "pid must be in"),
    ([protocol.MODE, b"shm"], "MODE shm: expected 3 frame(s), got 2"),
    ([protocol.MODE, b"mailbox", b"short"], "proof of 5 bytes, expected 16"),
    ([protocol.MODE, b"frames", b"x" * 16], "MODE frames: expected 2 frame(s), got 3"),
])
def test_malformed_frames_are_refused_with_a_reason(frames, fragment):
    parser = {protocol.BATCH: protocol.parse_batch, protocol.BATCHES: protocol.parse_batches,
              protocol.ACK: protocol.parse_ack, protocol.HELLO: protocol.parse_hello,
              protocol.TASK: protocol.parse_tasks, protocol.W_DONE: protocol.parse_worker_done,
              protocol.MODE: protocol.parse_mode}[frames[0]]
    with pytest.raises(ProtocolError) as err:
        parser(frames)
    assert fragment in str(err.value)


def test_records_are_little_endian_fixed_size():
    frames = protocol.batch(BatchMsg(1, 0, 2, 3, 4))
    assert struct.unpack("<IIqqQ", frames[1]) == (1, 0, 2, 3, 4)
