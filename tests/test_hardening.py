"""Hardening of shipped features: frames that outlive their slot, hostile messages, hung
workers, a server with no workers, dropped TCP clients and bounded resources. Real processes,
real sockets."""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from conftest import expected_batches, free_port, rgb_images

from ringfeed import Feed, RingfeedError, protocol
from ringfeed.status import query_status
from ringfeed.paths import pid_namespace
from ringfeed.server import Config, Service
from ringfeed.server.broker import FAILED_LINGER_S
from ringfeed.server.procs import pid_alive

AUG = ({"op": "random_crop", "size": 24}, {"op": "flip_lr"}, {"op": "normalize", "mean": 0.5, "std": 0.25})


def _slow_frames_reader(endpoint: str, count: int, pause_s: float, credit: int = 8):
    """A hand-written client on a narrow link (a 4 KiB receive buffer) that reads ``count``
    batches as frames, one every ``pause_s``; returns their (x bytes, y bytes)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    try:
        sock.send_multipart(protocol.hello(0, 0, credit, os.getpid(), pid_namespace()))
        assert sock.recv_multipart()[0] == protocol.WELCOME
        sock.send_multipart(protocol.mode("frames"))
        got = []
        while len(got) < count:
            frames = sock.recv_multipart()
            if frames[0] == protocol.BATCH:
                got.append((frames[2], frames[3]))
                sock.send_multipart(protocol.ack(1, []))
                time.sleep(pause_s)
            else:
                assert frames[0] == protocol.PING, frames[:2]
        return got
    finally:
        sock.close(0)


def test_a_slow_tcp_reader_gets_the_bytes_the_shm_path_gets(name):
    """Each batch's frames alias its slot; the slot is reused only when every frame is sent."""
    images, labels = rgb_images(512, 32), np.arange(512)
    config = Config(batch_size=64, workers=2, name=name, seed=5, augment=AUG,
                    endpoint=f"tcp://127.0.0.1:{free_port()}")
    count = 200
    expected = expected_batches(config, images, labels, count)
    with Service(config, features=images, labels=labels) as svc:
        got = _slow_frames_reader(svc.endpoint, count, pause_s=0.002)
    wrong = [seq for seq, ((x, y), (ex, ey)) in enumerate(zip(got, expected))
             if x != ex.tobytes() or y != ey.tobytes()]
    assert not wrong, f"{len(wrong)} of {count} batches carry other bytes: {wrong[:10]}"


def _raw_client(endpoint: str, **options) -> zmq.Socket:
    """A DEALER with ``options`` (zmq option names) set before it connects, as they must be."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    for option, value in options.items():
        sock.setsockopt(getattr(zmq, option), value)
    sock.connect(endpoint)
    return sock


def _reply(sock: zmq.Socket, frames: list[bytes]) -> list[bytes]:
    """Send ``frames``; the first reply that is not a PING."""
    sock.send_multipart(frames)
    while (reply := sock.recv_multipart())[0] == protocol.PING:
        pass
    return reply


def _hello(start=(0, 0), credit=2, **fields) -> list[bytes]:
    body = {"version": protocol.PROTOCOL_VERSION, "start": list(start), "credit": credit, "pid": 0,
            "pidns": "", "shard": [0, 1], **fields}
    return [protocol.HELLO, protocol.encode_json(body)]


def test_hostile_messages_cost_their_client_only(name):
    images, labels = rgb_images(256, 32), np.arange(256)
    config = Config(batch_size=8, workers=1, name=name, seed=9, augment=AUG)
    expected = expected_batches(config, images, labels, 6)
    with Service(config, features=images, labels=labels) as svc:
        sock = _raw_client(svc.endpoint)
        try:
            reply = _reply(sock, _hello(start=(2**63, 0)))  # packed as i64 in TASK, once
            assert protocol.parse_error(reply)["kind"] == "ProtocolError"
            reply = _reply(sock, [protocol.HELLO, b'{"a":' * 5000 + b"1" + b"}" * 5000])
            assert "nested too deeply" in protocol.parse_error(reply)["message"]
            assert _reply(sock, _hello(start=(protocol.MAX_POSITION, 0)))[0] == protocol.WELCOME
            batch = protocol.parse_batch(_reply(sock, protocol.mode("frames")), 2)
            assert (batch.epoch, batch.index) == (protocol.MAX_POSITION, 0)
        finally:
            sock.close(0)
        # Two clients of one job with different shards (a fan-in trainer restarted with another
        # number of servers), both leaving: the second replaced the first's job.
        members = [_raw_client(svc.endpoint) for _ in range(2)]
        try:
            for sock, shard in zip(members, ([0, 1], [0, 2])):
                assert _reply(sock, _hello(job="j", shard=shard))[0] == protocol.WELCOME
            for sock in members:
                sock.send_multipart([protocol.BYE])
        finally:
            for sock in members:
                sock.close(0)
        with Feed(svc.endpoint) as feed:
            got = [next(feed.generator()) for _ in range(1)] + [feed.next_batch(copy=True) for _ in range(5)]
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_a_stopped_worker_is_replaced_and_the_stream_stays_exact(name):
    images, labels = rgb_images(512, 32), np.arange(512)
    config = Config(batch_size=16, workers=2, name=name, seed=3, augment=AUG, task_timeout_s=1.5)
    count = 150
    expected = expected_batches(config, images, labels, count)
    with Service(config, features=images, labels=labels) as svc:
        with Feed(svc.endpoint, prefetch=4) as feed:
            got, times = [], []
            for seq in range(count):
                if seq == 40:
                    victim = query_status(svc.endpoint)["worker_pids"][0]
                    os.kill(victim, signal.SIGSTOP)
                got.append(feed.next_batch(copy=True))
                times.append(time.monotonic())
            status = query_status(svc.endpoint)
    assert status["worker_restarts"] >= 1 and victim not in status["worker_pids"]
    longest = max(b - a for a, b in zip(times, times[1:]))
    assert longest < config.task_timeout_s + 1.0, f"the stream stalled for {longest:.2f} s"
    for seq, ((x, y), (ex, ey)) in enumerate(zip(got, expected)):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey), f"batch {seq} differs"


RINGFEED = [sys.executable, "-m", "ringfeed.server.cli"]


def _serve(tmp_path, name, *options) -> subprocess.Popen:
    np.save(tmp_path / "features.npy", rgb_images(64, 16))
    np.save(tmp_path / "labels.npy", np.arange(64))
    config = tmp_path / "ringfeed.toml"
    config.write_text("\n".join(options))
    return subprocess.Popen([*RINGFEED, "serve", "--config", str(config), "--data", str(tmp_path),
                             "--batch-size", "4", "--name", name], stderr=subprocess.PIPE, text=True)


def test_with_no_workers_left_every_client_is_told_and_serve_exits_non_zero(tmp_path, name):
    server = _serve(tmp_path, name, "workers = 1", "max_worker_restarts = 0")
    try:
        with Feed(name=name, timeout_s=60) as feed:
            feed.next_batch(copy=True)
            os.kill(query_status(feed.endpoint)["worker_pids"][0], signal.SIGKILL)
            with pytest.raises(RingfeedError, match="no workers left"):
                for _ in range(10_000):
                    feed.next_batch(copy=True)
        with pytest.raises(RingfeedError, match="no workers left"):
            Feed(name=name)  # a client that comes later is told too
        status = subprocess.run([*RINGFEED, "status", "--name", name, "--json"], capture_output=True, text=True)
        state = json.loads(status.stdout)
        assert status.returncode == 3 and not state["ready"] and "no workers left" in state["failure"]
        assert server.wait(timeout=FAILED_LINGER_S + 20) == 1
    finally:
        server.kill()
    assert "the service failed: no workers left" in server.stderr.read()


_PAUSING_READER = """
import hashlib, json, sys, time
from ringfeed import Feed
endpoint, count, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with Feed(endpoint, transport="frames", timeout_s=20, prefetch=4) as feed:
    for k in range(count):
        x, y = feed.next_batch()
        print(json.dumps({"at": list(feed.last_batch), "x": hashlib.sha1(x.tobytes()).hexdigest(),
                          "y": y.tolist(), "reconnects": feed.stats["reconnects"]}), flush=True)
        if k == 5 and pause == "sleep":
            time.sleep(3)
"""


@pytest.mark.parametrize("pause", ["sleep", "sigstop"])
def test_a_paused_tcp_feed_continues_with_the_next_batch(name, tmp_path, pause):
    images, labels = rgb_images(256, 32), np.arange(256)
    config = Config(batch_size=8, workers=1, name=name, seed=4, augment=AUG, heartbeat_s=0.5,
                    endpoint=f"tcp://127.0.0.1:{free_port()}")
    count = 40
    expected = expected_batches(config, images, labels, count)
    script = tmp_path / "reader.py"
    script.write_text(_PAUSING_READER)
    with Service(config, features=images, labels=labels) as svc:
        # Unbuffered: a buffered readline may read past the sixth line, and communicate() reads
        # the pipe itself, so a line read ahead would be lost to the comparison below.
        reader = subprocess.Popen([sys.executable, str(script), svc.endpoint, str(count), pause],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        try:
            lines = [json.loads(reader.stdout.readline()) for _ in range(6)]
            if pause == "sigstop":
                reader.send_signal(signal.SIGSTOP)
                time.sleep(3)  # past the server's client timeout of 1.5 * heartbeat_s
                reader.send_signal(signal.SIGCONT)
            out, err = reader.communicate(timeout=60)
        finally:
            reader.kill()
    assert reader.returncode == 0, err.decode()
    lines += [json.loads(line) for line in out.splitlines()]
    steps = len(images) // config.batch_size
    assert [tuple(line["at"]) for line in lines] == [divmod(seq, steps) for seq in range(count)]
    for line, (ex, ey) in zip(lines, expected):
        assert line["x"] == hashlib.sha1(ex.tobytes()).hexdigest() and line["y"] == ey.tolist()
    if pause == "sigstop":
        assert lines[-1]["reconnects"] >= 1  # it was dropped and said HELLO again


def test_max_clients_refuses_more_with_the_reason(name):
    with Service(Config(batch_size=4, workers=1, name=name, max_clients=2), features=rgb_images(32, 8),
                 labels=np.arange(32)) as svc:
        first, second = Feed(svc.endpoint), Feed(svc.endpoint)
        with pytest.raises(RingfeedError, match=r"already has 2 clients \(max_clients=2\)"):
            Feed(svc.endpoint)
        first.close()
        deadline = time.monotonic() + 5
        while query_status(svc.endpoint)["clients"] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with Feed(svc.endpoint) as third:
            assert third.next_batch(copy=True)[0].shape == (4, 8, 8, 3)
        second.close()


def test_a_peer_that_does_not_map_the_ring_cannot_hold_slots(name):
    with Service(Config(batch_size=4, workers=1, name=name), features=rgb_images(64, 8),
                 labels=np.arange(64)) as svc:
        sock = _raw_client(svc.endpoint)
        try:
            assert _reply(sock, _hello())[0] == protocol.WELCOME
            for claimed in ("shm", "mailbox"):
                reply = _reply(sock, protocol.mode(claimed, bytes(protocol.PROOF_BYTES)))
                assert "the proof does not match this server's ring" in protocol.parse_error(reply)["message"]
            time.sleep(0.3)
            slots = query_status(svc.endpoint)["slots"]
            assert slots["free"] == slots["total"]  # nothing was made for it, nothing is held
            assert protocol.parse_batch(_reply(sock, protocol.mode("frames")), 2).index == 0
        finally:
            sock.close(0)


def test_a_worker_restart_out_of_file_descriptors_is_retried(name):
    images, labels = rgb_images(128, 32), np.arange(128)
    config = Config(batch_size=8, workers=1, name=name, seed=8, augment=AUG)
    expected = expected_batches(config, images, labels, 12)
    with Service(config, features=images, labels=labels) as svc:
        with Feed(svc.endpoint, prefetch=2) as feed:
            got = [feed.next_batch(copy=True) for _ in range(4)]
            worker = query_status(svc.endpoint)["worker_pids"][0]
            soft, hard = resource.prlimit(svc.pid, resource.RLIMIT_NOFILE)
            open_fds = len(os.listdir(f"/proc/{svc.pid}/fd"))
            # No room for a worker's pipes; no new connection may come meanwhile either (libzmq
            # 4.3.5's ipc listener aborts on EMFILE: the connection cap keeps it from there).
            resource.prlimit(svc.pid, resource.RLIMIT_NOFILE, (open_fds - 2, hard))
            os.kill(worker, signal.SIGKILL)
            time.sleep(2.5)  # a few failed starts
            assert pid_alive(svc.pid)
            resource.prlimit(svc.pid, resource.RLIMIT_NOFILE, (soft, hard))
            got += [feed.next_batch(copy=True) for _ in range(8)]
            status = query_status(svc.endpoint)
    assert status["workers"] == 1 and status["worker_restarts"] == 1
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_peers_that_stop_reading_hold_at_most_half_the_ring(name):
    """Frames sent to a peer that does not read stay queued, and so do their slots: together,
    frames clients may hold only half the ring, and a local feed keeps being served."""
    images, labels = rgb_images(128, 64), np.arange(128)
    config = Config(batch_size=32, workers=2, name=name, seed=6, slots=16,  # 1.5 MiB batches
                    augment=({"op": "random_crop", "size": 56}, {"op": "normalize", "mean": 0.5, "std": 0.25}),
                    endpoint=f"tcp://127.0.0.1:{free_port()}")
    with Service(config, features=images, labels=labels) as svc:
        stalled = []
        for _ in range(2):
            sock = _raw_client(svc.endpoint, RCVHWM=1, RCVBUF=4096)  # its libzmq stops reading TCP too
            assert _reply(sock, _hello(credit=8))[0] == protocol.WELCOME
            sock.send_multipart(protocol.mode("frames"))
            stalled.append(sock)
        got = []

        def read_locally():
            with Feed(svc.endpoint, transport="shm", prefetch=4) as feed:
                got.extend(feed.next_batch(copy=True)[1] for _ in range(20))

        try:
            for _ in range(10):
                for sock in stalled:
                    sock.send_multipart([protocol.PING])
                time.sleep(0.2)
            held = query_status(svc.endpoint)["slots"]["leased"]  # frames still in ZeroMQ's queues
            reader = threading.Thread(target=read_locally, daemon=True)
            reader.start()
            deadline = time.monotonic() + 20
            while reader.is_alive() and time.monotonic() < deadline:  # they say they are alive
                for sock in stalled:
                    sock.send_multipart([protocol.PING])
                reader.join(0.2)
        finally:
            for sock in stalled:
                sock.close(0)
    assert held <= config.slots // 2, f"peers that do not read hold {held} of {config.slots} slots"
    assert len(got) == 20, f"the local feed got {len(got)} of 20 batches"
