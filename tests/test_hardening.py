"""Hardening of shipped features: frames that outlive their slot, hostile messages, hung
workers, a server with no workers, dropped TCP clients and bounded resources. Real processes,
real sockets."""

import os
import signal
import time

import numpy as np
import pytest
import zmq
from conftest import expected_batches, free_port, rgb_images

from client import Feed, protocol
from client.paths import pid_namespace
from loader_server import Config, Service

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
