"""The client's PyTorch side: ``Feed.torch_generator()`` and ``Feed(pin_memory=True)``.

A real ``model.fit`` on Keras' torch backend through ``torch_generator()``
runs in ``benchmarks/gpu_fit.py --quick`` (tests/test_benchmarks.py): the
Keras backend is chosen once per process, and this one runs TensorFlow's.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from conftest import IMAGENET, leased_slots, rgb_images

torch = pytest.importorskip("torch")

from ringfeed import Feed, PinMemoryError  # noqa: E402
from ringfeed.server import Config, Service  # noqa: E402


@pytest.fixture
def service(name):
    images, labels = rgb_images(96), np.arange(96) % 10
    config = Config(batch_size=8, workers=1, slots=8, name=name, seed=5, augment=IMAGENET)
    with Service(config, features=images, labels=labels) as svc:
        yield svc


def test_torch_generator_gives_the_stream_as_tensors_over_the_ring(service):
    with Feed(service.endpoint, prefetch=2) as plain, Feed(service.endpoint, prefetch=2) as feed:
        expected = [(x.copy(), y.copy()) for x, y in (plain.next_batch() for _ in range(6))]
        batches = feed.torch_generator()
        mapping = feed._mapping
        for k, (want_x, want_y) in enumerate(expected):
            x, y = next(batches)
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"
            assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y)
            in_ring = mapping.address <= x.data_ptr() < mapping.address + mapping.nbytes
            assert in_ring == (k >= 2)  # the first two are copies, as generator()'s are
        del x, y
        gc.collect()
        feed.next_batch(copy=True)  # sends the ACK that gives the dead tensors' slots back
        assert leased_slots(service.endpoint, at_most=4) <= 4  # the two feeds' prefetch: no tensor pins a slot


def test_a_live_tensor_keeps_its_slot_and_its_data(service):
    with Feed(service.endpoint, prefetch=2) as feed:
        batches = feed.torch_generator()
        for _ in range(3):
            x, _ = next(batches)
        mapping = feed._mapping
        assert mapping.address <= x.data_ptr() < mapping.address + mapping.nbytes  # lent, not copied
        kept = x.clone()
        for _ in range(10):  # more batches than the ring has slots, while x is alive
            next(batches)
        assert torch.equal(x, kept)


def test_pin_memory_page_locks_the_ring_or_says_why_not(service):
    if torch.cuda.is_available():
        with Feed(service.endpoint, pin_memory=True) as feed:
            x, _ = feed.next_batch()
            assert torch.from_numpy(x).is_pinned()
            del x
    else:
        with pytest.raises(PinMemoryError, match=r"pin_memory=True needs a CUDA device"):
            Feed(service.endpoint, pin_memory=True)
        with Feed(service.endpoint) as feed:  # the service goes on serving
            assert feed.next_batch()[0].shape == (8, 24, 24, 3)
