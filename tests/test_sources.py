import numpy as np
import pytest

from ringfeed.server import shm, sources
from ringfeed.server.config import Config, ConfigError


def test_folder_is_memory_mapped(tmp_path):
    np.save(tmp_path / "features.npy", np.zeros((10, 4, 4, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(10))
    np.save(tmp_path / "unused.npy", np.arange(3))
    assert sources.field_names(str(tmp_path)) == ["features", "labels", "unused"]
    fields = sources.load_path(str(tmp_path), ("features", "labels"))
    assert list(fields) == ["features", "labels"]
    assert all(isinstance(array, np.memmap) for array in fields.values())


def test_npz_and_publish_round_trip(tmp_path):
    features = np.random.default_rng(0).random((12, 5), dtype=np.float32)
    labels = np.arange(12, dtype=np.int16).reshape(12, 1)
    weight = np.linspace(0, 1, 12)
    np.savez(tmp_path / "data.npz", image=features, cls=labels, weight=weight)
    loaded = sources.load_path(str(tmp_path / "data.npz"), ("image", "cls", "weight"))
    segment = shm.segment_name(1, "abcd", "data")
    ref = sources.publish(loaded, segment)
    try:
        opened = sources.open_ref(ref)
        assert list(opened) == ["image", "cls", "weight"]
        assert np.array_equal(opened["image"], features) and np.array_equal(opened["cls"], labels)
        assert opened["cls"].dtype == np.int16 and np.array_equal(opened["weight"], weight)
        assert not opened["image"].flags.writeable
    finally:
        shm.unlink(segment)


@pytest.mark.parametrize("fields, fragment", [
    ({"features": np.zeros((4, 3)), "labels": np.zeros(5)},
     "fields differ in length: 'labels' has 5 samples, 'features' has 4"),
    ({"features": np.zeros((4, 3)), "labels": np.array(["a"] * 4)},
     "(no objects, strings or records), got dtype <U1"),
    ({"features": np.zeros((4, 3)), "labels": np.array([None] * 4)}, "field 'labels' must be a numeric"),
    ({"features": [[1, 2]] * 4, "labels": np.zeros(4)}, "field 'features' must be a numpy array, got list"),
    ({"features": np.zeros((4, 3)), "labels": np.zeros((), np.float32)}, "field 'labels' must be a numeric or bool array"),
    ({"features": np.zeros((4, 3)), "2nd": np.zeros(4)}, "field name '2nd' is not an identifier"),
    ({"features": np.zeros((2, 3)), "labels": np.zeros(2)}, "batch_size 3 is larger than the dataset (2 samples)"),
])
def test_validation_names_the_problem(fields, fragment):
    with pytest.raises(ConfigError) as err:
        sources.validate(fields, batch_size=3)
    assert fragment in str(err.value)


def test_bad_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        sources.load_path(str(tmp_path / "nope"), ("features", "labels"))
    np.save(tmp_path / "labels.npy", np.arange(3))
    with pytest.raises(ConfigError, match=r"has no field\(s\) \['features'\]; it has \['labels'\]"):
        sources.load_path(str(tmp_path), ("features", "labels"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable .npz"):
        sources.load_path(str(tmp_path / "broken.npz"), ("features",))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match=r"has no field\(s\) \['features', 'labels'\]; it has \['x'\]"):
        sources.load_path(str(tmp_path / "other.npz"), ("features", "labels"))


def test_a_fortran_ordered_npy_is_refused_by_name(tmp_path):
    np.save(tmp_path / "features.npy", np.asfortranarray(np.zeros((10, 4, 4, 3), np.uint8)))
    np.save(tmp_path / "labels.npy", np.arange(10))
    with pytest.raises(ConfigError, match=r"features.npy is stored in Fortran order; expected C order"):
        sources.load_path(str(tmp_path), ("features", "labels"))


def test_private_data_gives_a_worker_its_own_copy_and_is_refused_past_half_the_memory():
    from ringfeed.server.batches import BatchMaker

    features = np.random.default_rng(0).integers(0, 255, (16, 4, 4, 3), np.uint8)
    segment = shm.segment_name(1, "abce", "data")
    ref = sources.publish({"features": features, "labels": np.arange(16)}, segment)
    try:
        shared = BatchMaker(Config(batch_size=4, workers=1), ref).fields["features"]
        private = BatchMaker(Config(batch_size=4, workers=1, private_data=True), ref).fields["features"]
        assert not shared.flags.owndata and private.flags.owndata and not private.flags.writeable
        assert np.array_equal(private, features)
        del shared, private
    finally:
        shm.unlink(segment)
    sources.check_private_copies(100, workers=2, available=600)
    with pytest.raises(ConfigError, match=r"private_data: 3 workers' copies and the shared one .* more than half"):
        sources.check_private_copies(100, workers=3, available=600)


def test_space_check_refuses_more_than_free():
    with pytest.raises(ConfigError, match="shm_size"):
        shm.check_space(shm.free_bytes() + 1, "a huge ring")


def test_remove_stale_keeps_live_owners():
    import os

    dead = shm.segment_name(2**22 + 12345, "dead", "ring")  # above pid_max: never a live process
    live = shm.segment_name(os.getpid(), "live", "ring")
    for name in (dead, live):
        shm.create(name, 4096)[0].close()
    try:
        removed = shm.remove_stale()
        assert dead in removed and live not in removed
        assert os.path.exists(f"/dev/shm/{live}") and not os.path.exists(f"/dev/shm/{dead}")
    finally:
        shm.unlink(live)
        shm.unlink(dead)
