"""The broker-worker link on a real socketpair: messages arrive whole and in order however the
bytes are split, a closed peer is seen after its last message, and bytes that are not records
raise ChannelError (the broker then kills that worker) and nothing else."""

import multiprocessing as mp
import os
import random
import socket
import struct

import pytest

from ringfeed.server.channel import MAX_RECORD_BYTES, SEND_TIMEOUT_S, Channel, ChannelError, pack, pair


def test_messages_arrive_whole_and_in_order_however_the_bytes_are_split():
    broker_end, worker_end = pair()
    reader = Channel(broker_end)
    rng = random.Random(5)
    sent = [[b"W_DONE", os.urandom(rng.randrange(0, 3000))] for _ in range(200)]
    stream = b"".join(pack(m) for m in sent)
    got = []
    at = 0
    while at < len(stream):
        step = rng.randrange(1, 700)
        worker_end.sendall(stream[at:at + step])
        at += step
        got += reader.receive()
    assert got == sent and not reader.closed


def test_a_closed_peer_is_seen_after_its_last_message():
    broker_end, worker_end = pair()
    reader = Channel(broker_end)
    Channel(worker_end).send([b"W_DONE", b"\x01" * 8])
    worker_end.close()
    messages = reader.receive()
    messages += reader.receive()  # the end of the stream may come with a second read
    assert messages == [[b"W_DONE", b"\x01" * 8]]
    assert reader.closed


def test_a_broker_end_never_blocks():
    broker_end, _ = pair()
    link = Channel(broker_end)
    assert link.receive() == []
    with pytest.raises(ChannelError, match="cannot send"):  # a worker that stopped reading
        for _ in range(10_000):
            link.send([b"TASK", b"x" * 60_000])


def _report_options(link: socket.socket) -> None:
    seconds, _ = struct.unpack("ll", link.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
    Channel(link).send([b"OPT", struct.pack("<?q", link.gettimeout() is None, seconds)])


def test_a_worker_end_stays_blocking_with_its_send_timeout_in_a_spawned_worker():
    broker_end, worker_end = pair()
    proc = mp.get_context("spawn").Process(target=_report_options, args=(worker_end,))
    proc.start()
    worker_end.close()
    proc.join(30)
    messages = Channel(broker_end).receive()
    assert messages == [[b"OPT", struct.pack("<?q", True, int(SEND_TIMEOUT_S))]]


def test_messages_before_bad_bytes_are_handed_over_before_the_error():
    broker_end, worker_end = pair()
    reader = Channel(broker_end)
    worker_end.sendall(pack([b"W_DONE", b"\x02" * 8]) + struct.pack("<I", MAX_RECORD_BYTES + 1))
    assert reader.receive() == [[b"W_DONE", b"\x02" * 8]]
    with pytest.raises(ChannelError, match="expected at most"):
        reader.receive()


def test_a_message_the_peer_would_refuse_is_not_sent():
    with pytest.raises(ValueError, match="expected at most"):
        pack([b"W_ERROR", b"x" * MAX_RECORD_BYTES])


@pytest.mark.parametrize("raw, fragment", [
    (struct.pack("<I", MAX_RECORD_BYTES + 1), "expected at most"),
    (struct.pack("<I", 1) + b"\x00", "no frame count"),
    (struct.pack("<IH", 2, 9), "a record of 9 frames"),
    (struct.pack("<IHI", 6, 1, 5), "frames of 5 bytes in a record with 0 bytes"),
    (struct.pack("<IH", 4, 2) + b"\x00\x00", "too short for 2 frame lengths"),
])
def test_bytes_that_are_not_records_are_refused_with_a_reason(raw, fragment):
    broker_end, worker_end = pair()
    worker_end.sendall(raw)
    with pytest.raises(ChannelError, match=fragment):
        Channel(broker_end).receive()


def test_random_bytes_give_messages_or_channel_errors_only():
    rng = random.Random(11)
    refused = 0
    for _ in range(500):
        broker_end, worker_end = pair()
        reader = Channel(broker_end)
        worker_end.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        try:
            for message in reader.receive() + reader.receive():
                assert all(isinstance(frame, bytes) for frame in message)
        except ChannelError:
            refused += 1
        broker_end.close()
        worker_end.close()
    assert refused > 400  # random lengths are mostly over the limit; the rest wait for more bytes


def test_a_worker_end_times_out_instead_of_blocking_on_a_broker_that_stopped_reading():
    _, worker_end = pair()
    worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 200_000))
    with pytest.raises(ChannelError, match="cannot send"):
        for _ in range(10_000):
            Channel(worker_end).send([b"W_DONE", b"x" * 60_000])
