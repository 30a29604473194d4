"""Crashes, vanished peers, restarts, hostile frames and CURVE: real processes throughout."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from conftest import expected_batches, free_port, rgb_images, segments_of, take

from ringfeed import Feed, RemoteWorkerError, RingfeedError, ServerGoneError, protocol
from ringfeed.server import worker_protocol
from ringfeed.status import query_status
from ringfeed.server import Config, ConfigError, Service
from ringfeed.server.auth import generate_keys
from ringfeed.server.procs import pid_alive
from ringfeed.server.sampler import Sampler


SMALL = ({"op": "random_crop", "size": 12}, {"op": "flip_lr"}, {"op": "normalize", "mean": 0.5, "std": 0.25})


def test_workers_killed_every_200ms_lose_and_duplicate_nothing(name):
    images, labels = rgb_images(1280, 32), np.arange(1280)
    config = Config(batch_size=32, workers=3, name=name, seed=21, max_worker_restarts=10_000,
                    augment=(*SMALL, {"op": "gaussian_noise", "std": 0.1}))
    steps = 1280 // 32
    expected = expected_batches(config, images, labels, 2 * steps)
    kills = []
    with Service(config, features=images, labels=labels) as svc, Feed(svc.endpoint, timeout_s=30) as feed:
        stop = threading.Event()

        def killer():
            rng = random.Random(0)
            while not stop.wait(0.2):
                ready = (query_status(svc.endpoint) or {}).get("workers_ready", [])
                if ready:
                    pid = rng.choice(ready)
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            got = []
            for x, y in feed.generator():  # a trainer's pace, so kills land mid-stream
                got.append((x.copy(), y.copy()))
                if len(got) == 2 * steps:
                    break
                time.sleep(0.03)
        finally:
            stop.set()
            thread.join(5)
        restarts = query_status(svc.endpoint)["worker_restarts"]
    assert len(kills) >= 5 and restarts >= 5
    for epoch in range(2):
        ids = np.concatenate([y for _, y in got[epoch * steps:(epoch + 1) * steps]])
        assert len(np.unique(ids)) == len(ids) == 1280
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def _poisoned_images(seed):
    images = rgb_images(64, 8) // 2
    poisoned = int(Sampler(64, 8, seed, "shuffle").indices(0, 2)[5])
    images[poisoned] = 255
    return images, poisoned


EXPLODE = ({"op": "normalize", "mean": 0.0, "std": 1.0},
           {"op": "custom", "fn": "custom_ops:explode", "params": [0.9]})


def test_on_error_skip_replaces_the_sample_and_counts_it(name):
    images, poisoned = _poisoned_images(seed=4)
    config = Config(batch_size=8, workers=2, name=name, seed=4, augment=EXPLODE, on_error="skip")
    # prefetch 2: past epoch 0, only batches 0 and 1 of epoch 1 are made; its poisoned one is 6
    with Service(config, features=images, labels=np.arange(64)) as svc, \
            Feed(svc.endpoint, prefetch=2) as feed:
        got = take(feed, feed.steps_per_epoch)
        status = query_status(svc.endpoint)
    ids = np.concatenate([y for _, y in got])
    assert poisoned not in ids and len(ids) == 64 and len(np.unique(ids)) == 63
    assert status["samples_skipped"] == 1
    assert max(x.max() for x, _ in got) <= 0.9


def test_on_error_raise_names_the_sample(name):
    images, poisoned = _poisoned_images(seed=4)
    config = Config(batch_size=8, workers=2, name=name, seed=4, augment=EXPLODE)
    with Service(config, features=images, labels=np.arange(64)) as svc, Feed(svc.endpoint) as feed:
        take(feed, 2)
        with pytest.raises(RingfeedError) as err:
            take(feed, 1)
        take(feed, 1)  # the error took batch (0, 2)'s place; the stream goes on after it
        assert feed.last_batch == (0, 3)
    assert (err.value.epoch, err.value.index) == (0, 2)
    assert err.value.sample == poisoned and "ValueError" in str(err.value)
    assert "explode" in err.value.traceback  # the worker's own traceback, through the user op


CLIENT_SCRIPT = """
import sys, time
from ringfeed import Feed
feed = Feed(sys.argv[1])
held = [b for _, b in zip(range(3), feed.generator())]
print("holding", flush=True)
time.sleep(600)
"""


def test_a_killed_client_gives_its_slots_back_and_others_carry_on(name):
    config = Config(batch_size=8, workers=2, slots=10, name=name, heartbeat_s=1.0)
    with Service(config, features=rgb_images(400, 16), labels=np.arange(400)) as svc, \
            Feed(svc.endpoint, prefetch=2) as other:
        victim = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, svc.endpoint], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            assert victim.stdout.readline().strip() == "holding"
            assert query_status(svc.endpoint)["clients"] == 2
            gen = other.generator()
            next(gen)
            victim.kill()
            killed_at, gaps, last = time.monotonic(), [], time.monotonic()
            while time.monotonic() - killed_at < 2 * config.heartbeat_s:
                next(gen)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
        finally:
            victim.kill()
            victim.wait(10)
        status = query_status(svc.endpoint)
        assert status["clients"] == 1
        assert status["slots"]["leased"] <= other.prefetch + 2
        assert max(gaps) < 2 * config.heartbeat_s


def test_server_killed_then_restarted_within_timeout_continues_the_stream(name):
    images, labels = rgb_images(200, 16), np.arange(200)
    config = Config(batch_size=8, workers=1, name=name, seed=8, augment=SMALL)
    expected = expected_batches(config, images, labels, 12)
    first = Service(config, features=images, labels=labels).start()
    second = None
    try:
        # A prefetch of 2, so the 7 batches after the kill cannot all come from the dead server's ring.
        with Feed(first.endpoint, timeout_s=20, prefetch=2) as feed:
            got = take(feed, 5)
            os.kill(first.pid, signal.SIGKILL)
            second = Service(config, features=images, labels=labels).start()
            got += take(feed, 7)
            assert feed.stats["reconnects"] == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_server_killed_with_no_restart_raises_within_5s(name):
    svc = Service(Config(batch_size=8, workers=1, name=name), features=rgb_images(80, 8),
                  labels=np.arange(80)).start()
    try:
        with Feed(svc.endpoint) as feed:  # default timeout_s
            take(feed, 2)
            os.kill(svc.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(ServerGoneError):
                take(feed, 1000)
            assert time.monotonic() - started <= 5.5
    finally:
        svc.stop()


def test_a_new_server_removes_the_segments_of_a_killed_one(name):
    config = Config(batch_size=8, workers=1, name=name)
    first = Service(config, features=rgb_images(80, 8), labels=np.arange(80)).start()
    dead_pid = first.pid
    os.kill(dead_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(dead_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segments_of(dead_pid)
    first._proc.join(10)
    first._proc = None  # keep stop() from cleaning up: the next server must do it
    try:
        with Service(config.with_overrides(name=name + "b"), features=rgb_images(80, 8),
                     labels=np.arange(80)):
            assert not segments_of(dead_pid)
    finally:
        first.stop()


def test_a_ring_larger_than_free_shm_is_refused(name):
    features = np.zeros((4, 1024 * 1024), np.float32)  # 4 MiB a sample
    # Larger than the whole tmpfs, so no other process's freeing space can make it fit.
    size_mib = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize / 2**20
    slots = int(size_mib // 4) + 8
    with pytest.raises(ConfigError, match=r"needs .* MiB of shared memory but /dev/shm has only"):
        Service(Config(batch_size=1, workers=1, slots=slots, name=name), features=features,
                labels=np.arange(4)).start()


def _fuzz_frames(rng: random.Random):
    valid_hello = protocol.hello(0, 0, 2, 0, "")[1]
    commands = [protocol.HELLO, protocol.ACK, protocol.PING, protocol.BYE, protocol.STATUS, protocol.BATCH,
                worker_protocol.W_DONE, b"", b"\x00" * 40, bytes(rng.randrange(256) for _ in range(6))]
    kind = rng.randrange(10)
    command = rng.choice(commands)
    if kind == 0:
        return [command]
    if kind == 1:
        return [command, bytes(rng.randrange(256) for _ in range(rng.randrange(64)))]
    if kind == 2:
        return [protocol.HELLO, valid_hello[:rng.randrange(len(valid_hello))]]
    if kind == 3:
        return [protocol.ACK, os.urandom(4 * rng.randrange(1, 40))]
    if kind == 4:
        junk = rng.choice(['{"version": V}', '{"version": V, "start": "x", "credit": 1}', "null", "1e999",
                           '{"version": V, "start": [0, 99999999], "credit": 1, "pid": 0, "pidns": ""}',
                           '{"version": V, "start": [0, 0], "credit": 5, "pid": -3, "pidns": ""}',
                           '{"version": V, "start": [9223372036854775808, 0], "credit": 1, "pid": 0, "pidns": ""}',
                           '{"version": V, "start": [0, 0], "credit": 1, "pid": 0, "pidns": "", "x": ' + "9" * 5000
                           + "}", '{"a":' * 5000 + "1" + "}" * 5000])
        return [protocol.HELLO, junk.replace("V", str(protocol.PROTOCOL_VERSION)).encode()]
    if kind == 5:
        return [command, b"x" * rng.choice([70_000, 120_000])]  # past MAX_JSON_BYTES, under the frame cap
    if kind == 6:
        return [command, b"a", b"b", b"c"][: rng.randrange(1, 5)]
    if kind == 7:  # members of one job asking for different shards, who then leave
        n = rng.randrange(1, 4)
        return rng.choice([protocol.hello(0, 0, 2, 0, "", job="j", shard=(rng.randrange(n), n)), [protocol.BYE]])
    if kind == 8:  # a peer that does not map the ring claiming it does
        return protocol.mode(rng.choice(["shm", "mailbox"]), os.urandom(protocol.PROOF_BYTES))
    return [protocol.HELLO, valid_hello, b"extra"]


def test_fuzzing_10000_malformed_frames_leaves_the_server_serving(name):
    images, labels = rgb_images(160, 16), np.arange(160)
    config = Config(batch_size=8, workers=2, name=name, seed=13, heartbeat_s=0.5)
    expected = expected_batches(config, images, labels, 10)
    ctx = zmq.Context.instance()
    rng = random.Random(1234)
    with Service(config, features=images, labels=labels) as svc:
        sent = 0
        for _ in range(50):  # workers have no endpoint: their links are socketpairs (test_channel.py)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(svc.endpoint)
            for _ in range(200):
                sock.send_multipart(_fuzz_frames(rng))
                sent += 1
            time.sleep(0.05)
            sock.close(0)
        assert sent == 10_000
        time.sleep(1.0)
        status = query_status(svc.endpoint)
        assert status["protocol_errors"] > 1000 and status["workers"] == 2
        with Feed(svc.endpoint) as feed:
            got = take(feed, 10)
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_curve_refuses_clients_without_the_right_key(name, tmp_path):
    keys = generate_keys(str(tmp_path / "keys"))
    np.save(tmp_path / "features.npy", rgb_images(40, 8))
    np.save(tmp_path / "labels.npy", np.arange(40))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "ringfeed.server.cli", "serve", "--data", str(tmp_path), "--batch-size", "4",
         "--workers", "1", "--name", name, "--endpoint", endpoint, "--curve-secret-key", keys["server_secret"],
         "--curve-authorized-keys", keys["authorized"]], stderr=subprocess.PIPE, text=True)
    try:
        with Feed(endpoint, timeout_s=60, curve_server_key=keys["server_public"],
                  curve_secret_key=keys["client_secret"]) as feed:
            assert next(feed.generator())[0].shape == (4, 8, 8, 3)
        assert query_status(endpoint, 5, keys["server_public"], keys["client_secret"])["workers"] == 1
        assert query_status(endpoint, 1) is None
        with pytest.raises(RingfeedError, match="refused this client's CURVE handshake"):
            Feed(endpoint, timeout_s=5, curve_server_key=keys["server_public"])  # a key it does not know
        with pytest.raises(RingfeedError):
            Feed(endpoint, timeout_s=2)  # no CURVE at all
    finally:
        server.terminate()
        log = server.communicate(timeout=20)[1]
    assert "refused a client: DENIED" in log


SCRIPT_WITH_SERVICE = """
import sys, time
import numpy as np
from ringfeed.server import Config, Service
if __name__ == "__main__":
    svc = Service(Config(batch_size=4, workers=1, name=sys.argv[1]), features=np.zeros((16, 3), np.float32),
                  labels=np.arange(16)).start()
    print(svc.pid, flush=True)
    time.sleep(600)
"""


def test_a_service_dies_with_the_script_that_started_it(name, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_WITH_SERVICE)
    owner = subprocess.Popen([sys.executable, str(script), name], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        server_pid = int(owner.stdout.readline())
        assert pid_alive(server_pid)
        owner.kill()
        deadline = time.monotonic() + 10
        while pid_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(server_pid)
    finally:
        owner.kill()
        owner.wait(10)


def test_a_batch_that_kills_its_worker_is_reported_after_three_deaths_and_the_stream_goes_on(name):
    images, poisoned = _poisoned_images(seed=4)
    augment = ({"op": "normalize", "mean": 0.0, "std": 1.0},
               {"op": "custom", "fn": "custom_ops:segfault", "params": [0.9]})
    config = Config(batch_size=8, workers=2, name=name, seed=4, augment=augment)
    # prefetch 2: the 6 batches read and the 2 asked for after them are all of epoch 0, so
    # epoch 1's batch with the poisoned sample is never made
    with Service(config, features=images, labels=np.arange(64)) as svc, \
            Feed(svc.endpoint, timeout_s=30, prefetch=2) as feed:
        got = []
        for _ in range(6):
            try:
                feed.next_batch()
                got.append(feed.last_batch)
            except RemoteWorkerError as err:
                got.append((err.kind, err.epoch, err.index))
        status = query_status(svc.endpoint)
    assert got == [(0, 0), (0, 1), ("WorkerCrash", 0, 2), (0, 3), (0, 4), (0, 5)]
    assert status["worker_restarts"] == 3  # only the poison batch killed workers; the others ran
