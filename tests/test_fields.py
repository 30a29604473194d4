"""Samples with named fields: several inputs and targets, sample weights, ops that move an
image and its mask together, and per-sample Python ops, through real servers and feeds."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import rgb_images

from ringfeed import FanInFeed, Feed, RemoteWorkerError
from ringfeed.status import query_status
from ringfeed.server import Config, ConfigError, Service

PILLOW_ROTATE = [{"op": "python", "fn": "python_ops:rotate", "kwargs": {"max_degrees": 40.0}}]


def _dataset(n=64, size=16):
    images = rgb_images(n, size)
    return {"image": images, "mask": (images[..., 0] % 7).astype(np.uint8),
            "meta": np.random.default_rng(1).random((n, 16), dtype=np.float32),
            "cls": np.arange(n) % 4, "box": np.random.default_rng(2).random((n, 4), dtype=np.float32),
            "weight": np.linspace(0.5, 1.5, n).astype(np.float32)}


def test_two_inputs_two_targets_and_a_weight_arrive_as_keras_expects(name):
    data = _dataset()
    config = Config(batch_size=8, workers=2, name=name, seed=5, inputs=["image", "meta"],
                    targets=["cls", "box"], sample_weight="weight")
    with Service(config, fields=data) as svc, Feed(svc.endpoint) as feed:
        x, y, w = feed.next_batch()
        assert set(x) == {"image", "meta"} and set(y) == {"cls", "box"}
        assert x["image"].shape == (8, 16, 16, 3) and x["meta"].shape == (8, 16) and w.shape == (8,)
        ids = y["cls"]  # the samples of this batch, by their rows of "meta"
        rows = [int(np.flatnonzero((data["meta"] == m).all(1))[0]) for m in x["meta"]]
        assert np.array_equal(ids, data["cls"][rows]) and np.array_equal(y["box"], data["box"][rows])
        assert np.array_equal(x["image"], data["image"][rows]) and np.array_equal(w, data["weight"][rows])
        assert [f.name for f in feed.spec.fields] == ["image", "meta", "cls", "box", "weight"]


def test_a_list_of_one_gives_a_dict_and_a_name_gives_the_array(name):
    data = _dataset()
    config = Config(batch_size=8, workers=1, name=name, inputs=["image"], targets="cls")
    with Service(config, fields=data) as svc, Feed(svc.endpoint, transport="frames") as feed:
        x, y = feed.next_batch()
    assert list(x) == ["image"] and isinstance(y, np.ndarray) and y.shape == (8,)


@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_an_image_and_its_mask_get_the_same_crop_and_flip(name, transport):
    data = _dataset(96, 20)
    augment = [{"op": "random_crop", "size": 14, "padding": 3, "fields": ["image", "mask"]},
               {"op": "flip_lr", "fields": ["image", "mask"]},
               {"op": "flip_ud", "fields": ["image", "mask"]}]
    config = Config(batch_size=16, workers=2, name=name, seed=1, inputs="image", targets="mask", augment=augment)
    with Service(config, fields=data) as svc, Feed(svc.endpoint, transport=transport) as feed:
        batches = [feed.next_batch(copy=True) for _ in range(2 * feed.steps_per_epoch)]
    moved = 0
    for x, mask in batches:
        assert x.shape == (16, 14, 14, 3) and mask.shape == (16, 14, 14)
        assert np.array_equal(mask, x[..., 0] % 7)  # padding is 0 in both, and 0 % 7 == 0
        moved += int((x[:, 0, 0, 0] == 0).sum())
    assert moved > 0  # some windows reached into the padding


def test_a_pillow_op_is_deterministic_for_any_worker_count_and_across_a_worker_kill(name):
    images, labels = rgb_images(96, 16), np.arange(96)
    streams = []
    for workers, kill in ((1, False), (2, False), (2, True)):
        config = Config(batch_size=8, workers=workers, name=f"{name}{workers}{kill:d}", seed=9,
                        augment=PILLOW_ROTATE)
        with Service(config, features=images, labels=labels) as svc, Feed(svc.endpoint, prefetch=4) as feed:
            batches = [feed.next_batch(copy=True) for _ in range(6)]
            if kill:  # mid-epoch, with batches in flight: they are recomputed by the replacement

                os.kill(query_status(svc.endpoint)["workers_ready"][0], signal.SIGKILL)
            batches += [feed.next_batch(copy=True) for _ in range(2 * feed.steps_per_epoch - 6)]
        streams.append(batches)
    for other in streams[1:]:
        assert all(x.tobytes() == ox.tobytes() and np.array_equal(y, oy)
                   for (x, y), (ox, oy) in zip(streams[0], other))
    x, y = streams[0][0]
    assert x.shape == (8, 16, 16, 3) and x.dtype == np.uint8
    assert not np.array_equal(x, images[y])  # rotated


# -- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("fields, options, fragment", [
    ({"image": [[1]] * 8, "labels": np.zeros(8)}, {"inputs": "image"}, "field 'image' must be a numpy array, got list"),
    ({"features": np.zeros((8, 3)), "labels": np.zeros(9)}, {},
     "fields differ in length: 'labels' has 9 samples, 'features' has 8"),
    ({"features": np.array([object()] * 8), "labels": np.zeros(8)}, {}, "field 'features' must be a numeric"),
    ({"features": np.array(["a"] * 8), "labels": np.zeros(8)}, {}, "got dtype <U1"),
    ({"pixels": np.zeros((8, 3)), "labels": np.zeros(8)}, {},
     "inputs names field 'features', which is not a field; the fields are ['labels', 'pixels']"),
    ({"features": np.zeros((8, 3)), "labels": np.zeros(8)}, {"targets": ["labels", "nope"]},
     "targets names field 'nope', which is not a field"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.zeros(8)},
     {"augment": [{"op": "flip_lr", "field": "labels"}]},
     "augment[0] (flip_lr): field 'labels' has per-sample shape () and dtype float64; ops take"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.zeros(8)},
     {"augment": [{"op": "flip_lr", "field": "mask"}]}, "augment[0] (flip_lr): 'mask' is not a field"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "mask": np.zeros((8, 5, 4), np.uint8)},
     {"targets": "mask", "augment": [{"op": "flip_lr", "fields": ["features", "mask"]}]},
     "must have the same height and width to move together"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.arange(8)},
     {"augment": [{"op": "python", "fn": "python_ops:fails_on", "kwargs": {"label": 0}}]},
     "augment[0] (python): fn 'python_ops:fails_on' failed on sample 0: RuntimeError: cannot process label 0"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.arange(8)},
     {"augment": [{"op": "python", "fn": "python_ops:drops_labels"}]}, "(missing ['labels'])"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.arange(8)},
     {"augment": [{"op": "python", "fn": "python_ops:returns_a_list"}]}, "returned a list; expected a dict"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.arange(8)},
     {"augment": [{"op": "python", "fn": "python_ops:nothing"}]}, "cannot import fn 'python_ops:nothing'"),
    ({"features": np.zeros((8, 4, 4, 3), np.uint8), "labels": np.arange(8)},
     {"augment": [{"op": "python", "fn": "python_ops:rotate", "field": "features"}]},
     "a python op takes fn and kwargs"),
])
def test_bad_fields_and_ops_are_refused_naming_them(name, fields, options, fragment):
    config = Config(batch_size=4, workers=1, name=name, **options)
    with pytest.raises(ConfigError) as err:
        Service(config, fields=fields).start()
    assert fragment in str(err.value)


@pytest.mark.parametrize("options, fragment", [
    ({"inputs": "2d"}, "inputs: '2d' is not a field name"),
    ({"inputs": ["a", "b"], "targets": "a"}, "field 'a' is listed twice: in inputs and in targets"),
    ({"sample_weight": ["w"]}, "sample_weight must be one field name"),
    ({"targets": []}, "targets must be a field name or a list of 1 to 64 field names"),
])
def test_bad_structures_are_config_errors(options, fragment):
    with pytest.raises(ConfigError) as err:
        Config(**options)
    assert fragment in str(err.value)


def test_a_python_op_that_fails_later_costs_that_batch_only_and_names_the_field(name):
    images, labels = rgb_images(64, 8), np.arange(64)
    augment = [{"op": "python", "fn": "python_ops:shrinks_after_sample_zero", "kwargs": {"label": 13}}]
    config = Config(batch_size=8, workers=1, name=name, seed=3, augment=augment)
    errors, good = [], 0
    with Service(config, features=images, labels=labels) as svc, Feed(svc.endpoint) as feed:
        for _ in range(feed.steps_per_epoch):
            try:
                feed.next_batch()
                good += 1
            except RemoteWorkerError as exc:
                errors.append(exc)
        assert feed.next_batch(copy=True)[0].shape == (8, 8, 8, 3)  # still serving
    assert good == feed.steps_per_epoch - 1 and len(errors) == 1
    message = str(errors[0])
    assert "field 'features' with shape (7, 8, 3) and dtype uint8; expected shape (8, 8, 3)" in message
    assert errors[0].details["sample"] == 13


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_fields_from_files_a_folder_of_npy_or_an_npz_with_any_names(name, tmp_path, kind):
    data = _dataset(40, 8)
    if kind == "folder":
        for field, array in data.items():
            np.save(tmp_path / f"{field}.npy", array)
        path = str(tmp_path)
    else:
        path = str(tmp_path / "set.npz")
        np.savez(path, **data)
    config = Config(data=path, batch_size=8, workers=1, name=name, inputs=["image", "meta"], targets="cls",
                    sample_weight="weight")
    with Service(config) as svc, Feed(svc.endpoint) as feed:
        x, y, w = feed.next_batch()
    rows = [int(np.flatnonzero((data["meta"] == m).all(1))[0]) for m in x["meta"]]
    assert np.array_equal(x["image"], data["image"][rows]) and np.array_equal(y, data["cls"][rows])
    assert np.array_equal(w, data["weight"][rows])


def test_files_with_fields_of_different_lengths_are_refused_naming_both(name, tmp_path):
    np.save(tmp_path / "features.npy", np.zeros((40, 3), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(39))
    with pytest.raises(ConfigError, match="fields differ in length: 'labels' has 39 samples, 'features' has 40"):
        Service(Config(data=str(tmp_path), batch_size=8, workers=1, name=name)).start()


def _flat(element):
    """An element's arrays in a fixed order, as bytes."""
    parts = [part if isinstance(part, dict) else {"": part} for part in element]
    return [np.ascontiguousarray(part[key]).tobytes() for part in parts for key in sorted(part)]


def test_fan_in_and_resume_give_the_one_server_stream_for_every_field(name):
    data = _dataset(64, 8)
    config = Config(batch_size=8, workers=1, seed=4, inputs=["image", "meta"], targets=["cls", "box"],
                    sample_weight="weight", augment=[{"op": "random_crop", "size": 6, "fields": ["image"]}])
    with Service(config.with_overrides(name=f"{name}a"), fields=data) as a, \
            Service(config.with_overrides(name=f"{name}b"), fields=data) as b:
        with Feed(a.endpoint, start=(1, 3)) as one:
            expected = [_flat(one.next_batch(copy=True)) for _ in range(10)]
        with FanInFeed([a.endpoint, b.endpoint], start=(1, 3), transport="frames") as both:
            assert [_flat(both.next_batch()) for _ in range(10)] == expected


def test_on_error_skip_replaces_the_sample_a_python_op_fails_on(name):
    images, labels = rgb_images(64, 8), np.arange(64)
    augment = [{"op": "python", "fn": "python_ops:fails_on", "kwargs": {"label": 13}}]
    config = Config(batch_size=8, workers=1, name=name, seed=3, augment=augment, on_error="skip")
    with Service(config, features=images, labels=labels) as svc, Feed(svc.endpoint) as feed:
        ids = np.concatenate([feed.next_batch(copy=True)[1] for _ in range(feed.steps_per_epoch)])
        skipped = query_status(svc.endpoint)["samples_skipped"]
        # Sample 13 is in every epoch once, and the worker may already have made up to the feed's
        # credit (prefetch) in batches past this epoch: each later epoch it reached skipped it too.
        epochs_made = 1 + -(-feed.prefetch // feed.steps_per_epoch)
    assert 13 not in ids and len(ids) == 64 and 1 <= skipped <= epochs_made
