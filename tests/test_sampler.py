import numpy as np

from ringfeed.server.sampler import Sampler


def test_shuffle_covers_every_sample_once_and_drops_the_remainder():
    sampler = Sampler(n=103, batch_size=10, seed=1, mode="shuffle")
    assert sampler.steps_per_epoch == 10
    for epoch in range(3):
        ids = np.concatenate([sampler.indices(epoch, i) for i in range(10)])
        assert len(ids) == 100 and len(set(ids.tolist())) == 100
    assert not np.array_equal(sampler.indices(0, 0), sampler.indices(1, 0))


def test_pure_function_of_seed_epoch_index():
    a, b = Sampler(50, 5, 7, "shuffle"), Sampler(50, 5, 7, "shuffle")
    assert np.array_equal(a.indices(3, 4), b.indices(3, 4))
    assert np.array_equal(a.indices(0, 1), Sampler(50, 5, 7, "shuffle").indices(0, 1))
    assert not np.array_equal(a.indices(0, 1), Sampler(50, 5, 8, "shuffle").indices(0, 1))


def test_replacement_draws_in_range_deterministically():
    sampler = Sampler(n=20, batch_size=64, seed=3, mode="replacement", steps_per_epoch=5)
    ids = sampler.indices(2, 4)
    assert ids.min() >= 0 and ids.max() < 20 and len(ids) == 64
    assert len(set(ids.tolist())) < 64  # with replacement: repeats are certain here
    assert np.array_equal(ids, Sampler(20, 64, 3, "replacement", 5).indices(2, 4))
    assert sampler.steps_per_epoch == 5
