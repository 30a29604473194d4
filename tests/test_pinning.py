"""``Feed(pin_memory=True)``'s bookkeeping, on hosts without a GPU.

The CUDA runtime is replaced by one that records what the feed registers:
the thing under test is when the feed pins and unpins its mapping of the
ring (pinned once per mapping, unpinned only after the last lent array and
the feed let go, and while the memory is still mapped), not CUDA itself,
which ``benchmarks/gpu_fit.py`` exercises on a GPU.
"""

from __future__ import annotations

import ctypes
import gc
import time

import numpy as np
import pytest
from conftest import rgb_images

from ringfeed import Feed, PinMemoryError, pinning
from ringfeed.server import Config, Service


class RecordingRuntime:
    """Answers ``cudaHostRegister``/``cudaHostUnregister`` with ``error`` and records the calls."""

    def __init__(self, error: int = 0):
        self.error, self.calls = error, []

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", address, nbytes, flags))
        return self.error

    def cudaHostUnregister(self, address: int) -> int:
        ctypes.string_at(address, 64)  # the memory must still be mapped (unmapped, this crashes)
        self.calls.append(("unregister", address))
        return 0


@pytest.fixture
def service(name):
    config = Config(batch_size=4, workers=1, slots=8, name=name, seed=1)
    with Service(config, features=rgb_images(32, 8), labels=np.arange(32) % 4) as svc:
        yield svc


def runtime(monkeypatch, error: int = 0) -> RecordingRuntime:
    fake = RecordingRuntime(error)
    monkeypatch.setattr(pinning, "cuda_runtime", lambda: fake)
    return fake


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return condition()


def test_the_mapping_is_pinned_once_and_unpinned_after_the_last_array_and_the_feed(service, monkeypatch):
    fake = runtime(monkeypatch)
    feed = Feed(service.endpoint, pin_memory=True, prefetch=2)
    mapping = feed._mapping
    assert fake.calls == [("register", mapping.address, mapping.nbytes, 1)]  # portable, the whole mapping
    x, y = feed.next_batch()
    address = mapping.address
    del mapping
    feed.close()
    time.sleep(0.3)
    gc.collect()
    assert len(fake.calls) == 1  # x and y still read ring memory: the page lock stays
    assert x.sum() >= 0
    del x, y
    assert wait_for(lambda: len(fake.calls) == 2)
    assert fake.calls[1] == ("unregister", address)


def test_a_failed_registration_is_a_clear_error_and_the_service_goes_on(service, monkeypatch):
    runtime(monkeypatch, error=2)
    with pytest.raises(PinMemoryError, match=r"cudaHostRegister of the ring mapping .* CUDA error 2"):
        Feed(service.endpoint, pin_memory=True)
    monkeypatch.undo()
    with Feed(service.endpoint) as feed:
        assert feed.next_batch()[0].shape == (4, 8, 8, 3)


def test_frames_are_not_pinned(service, monkeypatch):
    fake = runtime(monkeypatch)
    with Feed(service.endpoint, pin_memory=True, transport="frames") as feed:
        assert feed.next_batch()[0].shape == (4, 8, 8, 3)
    assert fake.calls == []
