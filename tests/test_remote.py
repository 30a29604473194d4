"""TCP transport, shared jobs and fan-in from several servers, on loopback only."""

import os
import signal

import numpy as np
import pytest
from conftest import expected_batches, free_port, rgb_images, take

from ringfeed import FanInFeed, Feed
from ringfeed.server import Config, Service

AUG = ({"op": "random_crop", "size": 12}, {"op": "flip_lr"}, {"op": "normalize", "mean": 0.5, "std": 0.25})


def test_tcp_frames_match_the_zero_copy_path_and_train(name):
    images, labels = rgb_images(320, 16), np.arange(320)
    config = Config(batch_size=16, workers=2, name=name, seed=17, augment=AUG,
                    endpoint=f"tcp://127.0.0.1:{free_port()}")
    with Service(config, features=images, labels=labels) as svc:
        with Feed(svc.endpoint, transport="frames") as remote, Feed(svc.endpoint, transport="shm") as local:
            over_tcp, zero_copy = take(remote, 25), take(local, 25)
            x, _ = next(remote.generator())
            assert not x.flags.owndata  # arrays over the received frames, not copies of them
        for (a, ay), (b, by) in zip(over_tcp, zero_copy):
            assert a.tobytes() == b.tobytes() and np.array_equal(ay, by)
        keras = pytest.importorskip("keras")
        with Feed(svc.endpoint, transport="frames") as feed:
            model = keras.Sequential([keras.Input(feed.spec.field("features").shape), keras.layers.Flatten(),
                                      keras.layers.Dense(320)])  # labels are sample ids
            model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            history = model.fit(feed.generator(), steps_per_epoch=feed.steps_per_epoch, epochs=2, verbose=0,
                                shuffle=False)
        assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()


def _three_servers(name, images, labels):
    services = []
    for k in range(3):
        config = Config(batch_size=16, workers=1, name=f"{name}{k}", seed=23, augment=AUG,
                        endpoint=f"tcp://127.0.0.1:{free_port()}")
        services.append(Service(config, features=images, labels=labels).start())
    return services


def test_three_servers_fan_in_every_sample_once_per_epoch(name):
    images, labels = rgb_images(480, 16), np.arange(480)
    services = _three_servers(name, images, labels)
    try:
        with FanInFeed([s.endpoint for s in services], transport="frames") as feed:
            assert isinstance(feed, FanInFeed) and feed.steps_per_epoch == 30
            got = take(feed, 60)
    finally:
        for svc in services:
            svc.stop()
    for epoch in range(2):
        ids = np.concatenate([y for _, y in got[epoch * 30:(epoch + 1) * 30]])
        assert len(ids) == 480 and len(np.unique(ids)) == 480
    expected = expected_batches(services[0].config, images, labels, 60)
    for (x, y), (ex, ey) in zip(got, expected):  # the very stream one server would give
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_fan_in_goes_on_when_a_server_dies(name, caplog):
    images, labels = rgb_images(480, 16), np.arange(480)
    services = _three_servers(name, images, labels)
    try:
        # prefetch 2: the killed server still owes most of its shard of epoch 0
        with FanInFeed([s.endpoint for s in services], transport="frames", timeout_s=1.0, prefetch=2) as feed:
            got = take(feed, 6)
            os.kill(services[1].pid, signal.SIGKILL)
            gen = feed.generator()
            while feed.position[0] == 0:  # the rest of epoch 0
                x, y = next(gen)
                got.append((x.copy(), y.copy()))
            assert feed.down == [services[1].endpoint] and feed.stats["missed"] > 0
    finally:
        for svc in services:
            svc.stop()
    ids = np.concatenate([y for _, y in got])
    assert len(np.unique(ids)) == len(ids) == 16 * (30 - feed.stats["missed"])
    assert "dropped out" in caplog.text


def test_two_clients_of_one_job_split_the_epoch(name):
    images, labels = rgb_images(640, 8), np.arange(640)
    config = Config(batch_size=16, workers=2, name=name, seed=3)
    with Service(config, features=images, labels=labels) as svc:
        with Feed(svc.endpoint, job="train", prefetch=2) as a, Feed(svc.endpoint, job="train", prefetch=2) as b:
            got = {"a": {}, "b": {}}
            for _ in range(60):
                for who, feed in (("a", a), ("b", b)):
                    y = feed.next_batch()[1].copy()
                    got[who][feed.last_batch] = y
                if sum(key[0] == 0 for part in got.values() for key in part) == 40:
                    break
        with Feed(svc.endpoint, job="other") as c:
            first_other = next(c.generator())[1].copy()
    assert not set(got["a"]) & set(got["b"])  # each batch went to one of them
    assert len(got["a"]) > 5 and len(got["b"]) > 5
    epoch0 = [y for part in got.values() for (epoch, _), y in part.items() if epoch == 0]
    ids = np.concatenate(epoch0)
    assert len(epoch0) == 40 and len(np.unique(ids)) == len(ids) == 640
    assert np.array_equal(first_other, expected_batches(config, images, labels, 1)[0][1])  # a new job: its own stream
