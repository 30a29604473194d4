"""Shared fixtures: an isolated runtime folder, unique service names, test datasets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import uuid

import numpy as np
import pytest

# A short private runtime folder: ipc socket paths must stay under ~100 characters.
_RUNTIME = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
os.environ["RINGFEED_RUNTIME_DIR"] = _RUNTIME

IMAGENET = [{"op": "random_crop", "size": [24, 24]}, {"op": "flip_lr"},
            {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_RUNTIME, ignore_errors=True)


@pytest.fixture
def name() -> str:
    return "t" + uuid.uuid4().hex[:10]


def default_sigint() -> None:
    """A child's ``preexec_fn``: SIGINT as a terminal's foreground job has it. A suite started in
    the background by a non-interactive shell inherits SIGINT ignored, and a Python started so
    never raises KeyboardInterrupt: a test of Ctrl-C would then test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def id_images(n: int, h: int = 8, w: int = 8, c: int = 2) -> np.ndarray:
    """float32 images whose every pixel encodes (sample id, row, column, channel)."""
    ids = np.arange(n, dtype=np.float32)[:, None, None, None]
    rows = np.arange(h, dtype=np.float32)[None, :, None, None]
    cols = np.arange(w, dtype=np.float32)[None, None, :, None]
    chans = np.arange(c, dtype=np.float32)[None, None, None, :]
    return ids * 10000 + rows * 100 + cols * 10 + chans


def rgb_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def take(feed, n):
    """The next ``n`` batches of ``feed``, copied out."""
    gen = feed.generator()
    return [(x.copy(), y.copy()) for x, y in (next(gen) for _ in range(n))]


def expected_batches(config, images, labels, n):
    """The first ``n`` batches a server with ``config`` must deliver, recomputed in this process."""
    from ringfeed.server.batches import BatchMaker
    from ringfeed.server.sources import publish

    segment = f"ringfeed-{os.getpid()}-{uuid.uuid4().hex[:8]}-data"
    try:
        maker = BatchMaker(config, publish({"features": images, "labels": labels}, segment))
        out = []
        for seq in range(n):
            batch = maker.empty_batch()
            maker.make(*divmod(seq, maker.sampler.steps_per_epoch), batch)
            out.append((batch["features"], batch["labels"]))
        return out
    finally:
        os.unlink(f"/dev/shm/{segment}")


def leased_slots(endpoint: str, at_most: int, seconds: float = 5.0) -> int:
    """The service's leased slots, once they have fallen to ``at_most`` or after ``seconds``
    (slots come back with a feed's next ACK, a moment after the arrays die)."""
    import time

    from ringfeed.status import query_status

    deadline = time.monotonic() + seconds
    while (held := query_status(endpoint)["slots"]["leased"]) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def spy_kernels(monkeypatch, *names: str) -> list[str]:
    """The names of the kernels ``names``, in the order they are called from now on (they still run)."""
    from ringfeed.server.augment import kernels

    calls: list[str] = []
    for name in names:
        monkeypatch.setattr(kernels, name, lambda *a, k=getattr(kernels, name), n=name: (calls.append(n), k(*a)))
    return calls


def ringfeed_segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("ringfeed-")}


def segments_of(pid: int) -> set[str]:
    """The ringfeed segments that name ``pid`` as their owner."""
    from ringfeed.paths import SEGMENT_NAME

    return {s for s in ringfeed_segments() if (m := SEGMENT_NAME.match(s)) and int(m.group(2)) == pid}
