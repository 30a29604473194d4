"""Keras' epochs as ringfeed's epochs, exact resume (Keras and a PyTorch-style loop), input-wait share."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import id_images

pytest.importorskip("tensorflow")

TRAINERS = Path(__file__).resolve().parent / "trainers.py"
N, BATCH = 40, 8  # 5 batches an epoch


def _service(name, **options):
    from ringfeed.server import Config, Service

    config = Config(batch_size=BATCH, workers=1, name=name, seed=5, **options)
    return Service(config, features=id_images(N), labels=np.arange(N, dtype=np.float32))


def _reference(endpoint, count):
    """The first ``count`` batches' features, read straight from a fresh feed."""
    from ringfeed import Feed

    with Feed(endpoint, copy=True) as feed:
        return [feed.next_batch()[0] for _ in range(count)]


def _recorder():
    import keras

    class Recorder(keras.Model):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trained, self.validated = [], []

        def train_step(self, data):
            self.trained.append(np.array(data[0]))
            return super().train_step(data)

        def test_step(self, data):
            self.validated.append(np.array(data[0]))
            return super().test_step(data)

    inputs = keras.Input((8, 8, 2))
    model = Recorder(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    return model


def _same(got, want) -> bool:
    return len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_each_keras_epoch_is_one_ringfeed_epoch_with_validation_and_no_warnings(name):
    from ringfeed import Feed
    from ringfeed.keras import InputStallMonitor, InputStallWarning

    model = _recorder()
    with _service(name) as svc:
        want = _reference(svc.endpoint, 15)
        with Feed(svc.endpoint) as feed, Feed(svc.endpoint) as val_feed, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            monitor = InputStallMonitor(feed, warn_share=1.0)
            history = model.fit(feed.keras_input(), validation_data=val_feed.keras_input(), epochs=3,
                                callbacks=[monitor], verbose=0)
            assert feed.progress == (3, 0) and val_feed.progress == (3, 0)
    assert [str(w.message) for w in seen if not issubclass(w.category, InputStallWarning)] == []
    assert _same(model.trained, want)  # step k of Keras' epoch e trained ringfeed's batch (e, k)
    assert _same(model.validated, want)  # the validation feed's epoch e, once per Keras epoch
    shares = history.history["input_wait_share"]
    assert len(shares) == 3 and all(0 <= s < 1 for s in shares)


def test_the_stall_monitor_warns_once_naming_the_cause(name):
    from ringfeed import Feed
    from ringfeed.keras import InputStallMonitor, InputStallWarning

    model = _recorder()
    slow = [{"op": "python", "fn": "python_ops:slow", "kwargs": {"seconds": 0.01}}]
    with _service(name, augment=slow, slots=4) as svc, Feed(svc.endpoint) as feed:
        with pytest.warns(InputStallWarning) as caught:
            history = model.fit(feed.keras_input(), epochs=3, verbose=0,
                                callbacks=[InputStallMonitor(feed, warn_share=0.3)])
    stalls = [w for w in caught if issubclass(w.category, InputStallWarning)]
    assert len(stalls) == 1
    assert "of epoch 0" in str(stalls[0].message) and "add workers" in str(stalls[0].message)
    assert all(share > 0.3 for share in history.history["input_wait_share"])


def _run(*args, timeout=240):
    out = subprocess.run([sys.executable, str(TRAINERS), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def _trained(path) -> list:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def test_keras_resumes_mid_epoch_in_a_new_process_and_trains_the_uninterrupted_stream(name, tmp_path):
    with _service(name) as svc:
        want = _reference(svc.endpoint, 15)
        _run("keras", svc.endpoint, tmp_path / "ckpt", tmp_path / "first.npz", 3, 7)  # dies after (1, 2)
        _run("keras", svc.endpoint, tmp_path / "ckpt", tmp_path / "second.npz", 3, -1)
    first, second = _trained(tmp_path / "first.npz"), _trained(tmp_path / "second.npz")
    assert len(first) == 8 and len(second) == 7
    assert _same(first + second, want)


def test_a_torch_loop_resumes_from_its_state_dict_in_a_new_process(name, tmp_path):
    pytest.importorskip("torch")
    with _service(name) as svc:
        want = _reference(svc.endpoint, 12)
        _run("torch", svc.endpoint, tmp_path / "state.json", tmp_path / "first.npz", 12, 6)
        _run("torch", svc.endpoint, tmp_path / "state.json", tmp_path / "second.npz", 12, -1)
    first, second = _trained(tmp_path / "first.npz"), _trained(tmp_path / "second.npz")
    assert len(first) == 7 and len(second) == 5
    assert _same(first + second, want)


def test_a_checkpoint_refuses_a_fit_that_starts_in_another_epoch(name, tmp_path):
    from ringfeed import Feed
    from ringfeed.keras import StreamCheckpoint

    model = _recorder()
    ckpt = StreamCheckpoint(tmp_path)
    with _service(name) as svc, Feed(svc.endpoint) as feed:
        model.fit(feed.keras_input(), epochs=1, callbacks=[ckpt], verbose=0)
        assert StreamCheckpoint(tmp_path).position == (1, 0)
        with pytest.raises(ValueError, match=r"initial_epoch=0.* resumes in epoch 1"):
            model.fit(feed.keras_input(), epochs=2, callbacks=[StreamCheckpoint(tmp_path)], verbose=0)
    (tmp_path / "latest.json").write_text('{"checkpoint": "../x", "position": [1]}')
    with pytest.raises(ValueError, match="not a ringfeed checkpoint record"):
        StreamCheckpoint(tmp_path)


def test_state_dicts_are_checked_and_seek_waits_for_lent_batches(name):
    from ringfeed import Feed, RingfeedError

    with _service(name) as svc, Feed(svc.endpoint) as feed:
        state = feed.state_dict()
        assert state == {"position": [0, 0], "steps_per_epoch": 5, "batch_size": BATCH, "samples": N}
        with pytest.raises(ValueError, match="another stream"):
            feed.load_state_dict({**state, "batch_size": 16})
        with pytest.raises(ValueError, match=r"expected \[epoch >= 0, index in 0..4\]"):
            feed.load_state_dict({**state, "position": [0, 5]})
        lent = feed.next_batch()
        with pytest.raises(RingfeedError, match="while 1 batches are lent"):
            feed.load_state_dict({**state, "position": [2, 3]})
        del lent
        feed.load_state_dict({**state, "position": [2, 3]})
        assert feed.position == (2, 3)
        got = feed.next_batch(copy=True)[0]
    with _service(name + "b") as svc:
        want = _reference(svc.endpoint, 14)[13]
    assert np.array_equal(got, want)
