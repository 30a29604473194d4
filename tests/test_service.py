"""End to end: real server process, worker processes, shared memory and ZeroMQ."""

import hashlib
import os
import signal
import time

import numpy as np
import pytest
from conftest import IMAGENET, free_port, id_images, rgb_images, ringfeed_segments, spy_kernels

from ringfeed import Feed, RemoteWorkerError, ServerGoneError
from ringfeed.status import query_status
from ringfeed.server import Config, ConfigError, Service
from ringfeed.server.sampler import Sampler
from ringfeed.server.sources import publish
from ringfeed.server.batches import BatchMaker
from ringfeed.server.ring import aligned_empty


def take(feed, n, copy=True):
    gen = feed.generator()
    out = []
    for _ in range(n):
        x, y = next(gen)
        out.append((x.copy(), y.copy()) if copy else (x, y))
    return out


def test_shuffle_gives_every_sample_once_per_epoch(name):
    n = 1000
    features = np.random.default_rng(0).random((n, 4), dtype=np.float32)
    with Service(Config(batch_size=32, workers=2, name=name, seed=3), features=features,
                 labels=np.arange(n)) as svc, Feed(svc.endpoint) as feed:
        steps = feed.steps_per_epoch
        assert steps == n // 32 and feed.spec.field("labels").dtype == np.int64
        batches = take(feed, 2 * steps)
    for epoch in range(2):
        ids = np.concatenate([y for _, y in batches[epoch * steps:(epoch + 1) * steps]])
        assert len(ids) == steps * 32 and len(np.unique(ids)) == len(ids)
    first, second = (np.concatenate([y for _, y in batches[e * steps:(e + 1) * steps]]) for e in range(2))
    assert not np.array_equal(first, second)  # a fresh permutation each epoch


def test_batches_are_byte_identical_for_any_worker_count(name):
    images = rgb_images(600, 32)
    augment = [*IMAGENET[:2], {"op": "brightness", "max_delta": 0.1}, IMAGENET[2],
               {"op": "gaussian_noise", "std": 0.05}]
    digests = {}
    for workers, private in ((1, False), (2, False), (3, False), (2, True)):
        config = Config(batch_size=16, workers=workers, name=f"{name}{workers}{private:d}", seed=11,
                        augment=augment, private_data=private)
        with Service(config, features=images, labels=np.arange(600)) as svc, Feed(svc.endpoint) as feed:
            digest = hashlib.sha256()
            for x, y in take(feed, 20):
                digest.update(x.tobytes())
                digest.update(y.tobytes())
            digests[workers, private] = digest.hexdigest()
    assert len(set(digests.values())) == 1, digests


def _assert_intact(x, y, images):
    np.testing.assert_array_equal(np.asarray(x), images[np.asarray(y)])


def test_integrity_when_the_consumer_holds_every_batch(name):
    images = id_images(256, 8, 8, 2)
    config = Config(batch_size=16, workers=2, slots=6, name=name, seed=5)
    with Service(config, features=images, labels=np.arange(256)) as svc, Feed(svc.endpoint, prefetch=2) as feed:
        held = take(feed, 3 * feed.steps_per_epoch, copy=False)  # 48 batches on a ring of 6 slots
        zero_copy = sum(not x.flags.owndata for x, _ in held)
        assert 0 < zero_copy < len(held), "expected both lent and copied batches"
        for x, y in held:
            _assert_intact(x, y, images)
        held.clear()
        time.sleep(0.5)
        assert query_status(svc.endpoint)["slots"]["leased"] <= 2  # dead arrays gave their slots back


def test_integrity_with_tensorflow_holding_tensors(name):
    tf = pytest.importorskip("tensorflow")
    images = id_images(256, 8, 8, 2)
    config = Config(batch_size=16, workers=2, slots=6, name=name, seed=6)
    with Service(config, features=images, labels=np.arange(256)) as svc, Feed(svc.endpoint) as feed:
        dataset = feed.as_tf_dataset()
        assert dataset.element_spec[0].shape == (16, 8, 8, 2) and dataset.element_spec[1].dtype == tf.int64
        tensors = [batch for _, batch in zip(range(40), dataset)]
        for x, y in tensors:
            _assert_intact(x.numpy(), y.numpy(), images)


def test_server_killed_raises_within_timeout_and_workers_exit(name):
    images = rgb_images(200, 16)
    svc = Service(Config(batch_size=8, workers=2, name=name), features=images, labels=np.arange(200)).start()
    try:
        worker_pids = query_status(svc.endpoint)["worker_pids"]
        feed = Feed(svc.endpoint, timeout_s=2.0)
        take(feed, 3)
        os.kill(svc.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ServerGoneError, match="went away"):
            take(feed, 10_000)
        assert time.monotonic() - started < 2.0 + 1.5
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in worker_pids)
    finally:
        svc.stop()
    assert not any(f"-{svc.config.name}" in s for s in ringfeed_segments())


def _alive(pid):
    from ringfeed.server.procs import pid_alive

    return pid_alive(pid)


def test_no_server_is_a_clear_error_not_a_hang(name):
    started = time.monotonic()
    with pytest.raises(ServerGoneError, match="no ringfeed server answered"):
        Feed(f"ipc:///tmp/{name}.sock", timeout_s=0.5)
    assert time.monotonic() - started < 2


def test_custom_op_end_to_end_matches_an_in_process_recomputation(name):
    images = rgb_images(64, 16)
    augment = ({"op": "normalize", "mean": 0.0, "std": 1.0},
               {"op": "custom", "fn": "custom_ops:solarize", "params": [0.5]})
    config = Config(batch_size=8, workers=2, name=name, seed=2, augment=augment)
    with Service(config, features=images, labels=np.arange(64)) as svc, \
            Feed(svc.endpoint, start=(1, 2)) as feed:
        (x, y), = take(feed, 1)
    assert x.max() <= 0.5 + 1e-6  # solarized above the threshold
    segment = f"ringfeed-{os.getpid()}-abcdef01-data"
    try:
        maker = BatchMaker(config, publish({"features": images, "labels": np.arange(64)}, segment))
        expected = maker.empty_batch()
        maker.make(1, 2, expected)
        ex, ey = expected["features"], expected["labels"]
    finally:
        os.unlink(f"/dev/shm/{segment}")
    assert ex.tobytes() == x.tobytes() and np.array_equal(ey, y)


def test_slots_written_with_streaming_stores_hold_the_batches_plain_stores_make(name):
    """crop/flip/normalize to 24 x 24 x 3 floats: rows of 72 floats start on 32-byte boundaries
    in a slot, so workers write them with streaming stores, unless ``streaming_stores`` is off."""
    images = rgb_images(300, 32)
    batches = {}
    for streaming in (True, False):
        config = Config(batch_size=16, workers=2, name=f"{name}{streaming:d}", seed=3, augment=IMAGENET,
                        streaming_stores=streaming)
        with Service(config, features=images, labels=np.arange(300)) as svc, Feed(svc.endpoint) as feed:
            batches[streaming] = take(feed, 2 * feed.steps_per_epoch)
    segment = f"ringfeed-{os.getpid()}-abcdef02-data"
    try:
        maker = BatchMaker(config, publish({"features": images, "labels": np.arange(300)}, segment))
        ex, ey = np.empty_like(batches[True][-1][0]), np.empty_like(batches[True][-1][1])  # numpy's: not streamed
        maker.make(1, maker.sampler.steps_per_epoch - 1, {"features": ex, "labels": ey})
    finally:
        os.unlink(f"/dev/shm/{segment}")
    for (x, y), (px, py) in zip(batches[True], batches[False]):
        assert x.tobytes() == px.tobytes() and np.array_equal(y, py)
    assert ex.tobytes() == batches[True][-1][0].tobytes() and np.array_equal(ey, batches[True][-1][1])


def test_batch_maker_streams_only_when_told_its_x_is_a_slot(monkeypatch):
    images = rgb_images(64, 32)
    calls = spy_kernels(monkeypatch, "gather_convert", "gather_convert_streamed")
    segment = f"ringfeed-{os.getpid()}-abcdef03-data"
    try:
        maker = BatchMaker(Config(batch_size=8, workers=1, augment=IMAGENET),
                           publish({"features": images, "labels": np.arange(64)}, segment))
        batch = {"features": aligned_empty((8, 24, 24, 3), np.float32), "labels": np.empty(8, np.int64)}
        for stream in (True, False):
            maker.make(0, 1, batch, stream)
    finally:
        os.unlink(f"/dev/shm/{segment}")
    assert calls == ["gather_convert_streamed", "gather_convert"]


def test_worker_exception_reaches_the_client_with_its_traceback(name):
    images = rgb_images(64, 8) // 2
    poisoned = Sampler(64, 8, 4, "shuffle").indices(0, 1)[3]  # in batch (0, 1), not in (0, 0)
    images[poisoned] = 255
    augment = ({"op": "normalize", "mean": 0.0, "std": 1.0},
               {"op": "custom", "fn": "custom_ops:explode", "params": [0.9]})
    config = Config(batch_size=8, workers=1, name=name, seed=4, augment=augment)
    with Service(config, features=images, labels=np.arange(64)) as svc, Feed(svc.endpoint) as feed:
        take(feed, 1)
        with pytest.raises(RemoteWorkerError) as err:
            take(feed, 1)
    assert err.value.kind == "ValueError" and (err.value.epoch, err.value.index) == (0, 1)
    assert err.value.sample == poisoned and f"sample {poisoned}" in str(err.value)
    assert "poisoned sample" in str(err.value) and "worker traceback" in str(err.value)
    assert "pipeline.py" in err.value.traceback


def test_a_pipeline_that_fails_on_the_first_batch_is_refused_at_start(name):
    augment = ({"op": "normalize", "mean": 0.0, "std": 1.0},
               {"op": "custom", "fn": "custom_ops:explode", "params": [-1.0]})
    config = Config(batch_size=8, workers=1, name=name, augment=augment)
    with pytest.raises(ConfigError, match=r"failed on batch \(epoch 0, index 0\), sample \d+: ValueError: poisoned sample"):
        Service(config, features=rgb_images(32, 8), labels=np.arange(32)).start()


def test_a_slow_consumer_leaves_workers_idle_and_memory_bounded(name):
    config = Config(batch_size=8, workers=2, slots=10, name=name)
    with Service(config, features=rgb_images(400, 16), labels=np.arange(400)) as svc, \
            Feed(svc.endpoint, prefetch=3) as feed:
        take(feed, 2)
        time.sleep(1.0)
        status = query_status(svc.endpoint)
        slots = status["slots"]
        assert slots["filling"] == 0 and slots["ready"] + slots["leased"] <= 3 + 2
        assert status["batches_served"] <= 2 + 3


@pytest.mark.parametrize("options, features, labels, fragment", [
    ({"data": "/nonexistent/ringfeed"}, None, None, "'/nonexistent/ringfeed' does not exist"),
    ({}, rgb_images(10, 8), np.arange(9), "fields differ in length: 'labels' has 9 samples, 'features' has 10"),
    ({"augment": ({"op": "random_crop", "size": 12},)}, rgb_images(10, 8), np.arange(10),
     "crop size [12, 12] is larger than the image 8x8"),
    ({"augment": ({"op": "sharpen"},)}, rgb_images(10, 8), np.arange(10), "unknown op 'sharpen'"),
    ({"augment": ({"op": "flip_lr"},)}, np.zeros((10, 8, 8, 3), np.float64), np.arange(10),
     "field 'features' has per-sample shape (8, 8, 3) and dtype float64; ops take"),
])
def test_bad_config_fails_at_start_naming_the_value(name, options, features, labels, fragment):
    config = Config(batch_size=4, workers=1, name=name, **options)
    with pytest.raises(ConfigError) as err:
        Service(config, features=features, labels=labels).start()
    assert fragment in str(err.value)


def test_non_positive_batch_size_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        Service(Config(batch_size=0))


def test_npz_data_and_resume_position(name, tmp_path):
    images = rgb_images(100, 8)
    np.savez(tmp_path / "d.npz", features=images, labels=np.arange(100))
    config = Config(data=str(tmp_path / "d.npz"), batch_size=10, workers=1, name=name, seed=9)
    with Service(config) as svc:
        with Feed(svc.endpoint) as feed:
            stream = take(feed, 14)
            assert feed.position == (1, 4)
        with Feed(svc.endpoint, start=(1, 2)) as resumed:
            x, y = take(resumed, 1)[0]
    assert np.array_equal(y, stream[12][1]) and np.array_equal(x, stream[12][0])


@pytest.mark.parametrize("route", ["mailbox", "batches", "frames"])
def test_every_delivery_route_gives_the_stream_with_errors_in_their_place(name, route, monkeypatch):
    """Mailbox (the local default), BATCHES messages (machines without the mailbox's memory
    ordering) and frames: the same batches in the same order, each failed batch raised in its place."""
    from ringfeed import mailbox

    images = rgb_images(64, 8) // 2
    poisoned = Sampler(64, 8, 4, "shuffle").indices(0, 1)[3]
    images[poisoned] = 255
    augment = ({"op": "normalize", "mean": 0.0, "std": 1.0},
               {"op": "custom", "fn": "custom_ops:explode", "params": [0.9]})
    config = Config(batch_size=8, workers=2, name=name, seed=4, augment=augment)
    if route == "batches":
        monkeypatch.setattr(mailbox, "supported", lambda: False)
    sampler = Sampler(64, 8, 4, "shuffle")
    with Service(config, features=images, labels=np.arange(64)) as svc, \
            Feed(svc.endpoint, transport="frames" if route == "frames" else "auto") as feed:
        assert feed._arrivals.mode == {"mailbox": "mailbox", "batches": "shm", "frames": "frames"}[route]
        for seq in range(3 * sampler.steps_per_epoch):
            epoch, index = divmod(seq, sampler.steps_per_epoch)
            ids = sampler.indices(epoch, index)
            if poisoned in ids:
                with pytest.raises(RemoteWorkerError) as err:
                    feed.next_batch()
                assert (err.value.epoch, err.value.index, err.value.sample) == (epoch, index, poisoned)
            else:
                _, y = feed.next_batch()
                assert feed.last_batch == (epoch, index) and np.array_equal(y, ids)


def test_a_feed_starved_of_slots_by_another_stays_connected_and_resumes(name):
    """Feeds hold slots with their unread and kept batches; one that gets none waits, keeps
    pinging (over TCP a silent client expires in 1.5 heartbeats) and goes on once slots return."""
    import threading

    config = Config(batch_size=4, workers=1, slots=6, name=name, heartbeat_s=0.5,
                    endpoint=f"tcp://127.0.0.1:{free_port()}")
    with Service(config, features=rgb_images(200, 8), labels=np.arange(200)) as svc:
        hog = Feed(svc.endpoint, prefetch=3)
        kept = [hog.next_batch() for _ in range(3)]  # held, and its credit refills the rest of the ring
        deadline = time.monotonic() + 5
        while query_status(svc.endpoint)["slots"]["leased"] < config.slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert query_status(svc.endpoint)["slots"]["leased"] == config.slots
        with Feed(svc.endpoint, prefetch=2) as starved:
            got = []
            reader = threading.Thread(target=lambda: got.append(starved.next_batch()[1].copy()))
            reader.start()
            reader.join(4 * config.heartbeat_s * 1.5)
            assert reader.is_alive() and query_status(svc.endpoint)["clients"] == 2
            del kept
            hog.close()
            reader.join(10)
            assert not reader.is_alive() and len(got) == 1 and got[0].shape == (4,)
