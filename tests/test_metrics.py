"""loader_server/metrics.py with a fake clock: window and lifetime rates, busy shares, ring dry share."""

import pytest

from ringfeed.server.metrics import BUCKET_S, METRICS_WINDOW_S, Metrics


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock():
    return Clock()


def test_window_rate_forgets_old_samples_and_since_start_remembers(clock):
    metrics = Metrics(clock)
    for _ in range(40):  # 40 batches of 32 over 4 s
        clock.advance(0.1)
        metrics.served(32)
    snap = metrics.snapshot()
    assert snap.uptime_s == pytest.approx(4.0)
    assert snap.samples_per_s_window == pytest.approx(320.0)
    assert snap.samples_per_s_since_start == pytest.approx(320.0)
    clock.advance(METRICS_WINDOW_S + 2 * BUCKET_S)  # training pauses for longer than the window
    snap = metrics.snapshot()
    assert snap.samples_per_s_window == 0.0
    assert snap.samples_per_s_since_start == pytest.approx(40 * 32 / (4.0 + METRICS_WINDOW_S + 2 * BUCKET_S))
    assert snap.samples_total == 40 * 32


def test_window_rate_after_a_pause_is_over_the_whole_window(clock):
    metrics = Metrics(clock)
    clock.advance(30.0)
    metrics.served(100)
    clock.advance(1.0)
    snap = metrics.snapshot()
    assert METRICS_WINDOW_S <= snap.window_s <= METRICS_WINDOW_S + BUCKET_S
    assert snap.samples_per_s_window == pytest.approx(100 / snap.window_s)


def test_busy_share_and_batch_time_per_worker(clock):
    metrics = Metrics(clock)
    clock.advance(METRICS_WINDOW_S)  # a full window of history, all idle
    metrics.worker_assigned(0)
    metrics.worker_assigned(1)
    for _ in range(10):  # worker 0: busy throughout, 0.25 s per batch; worker 1: one batch of 0.5 s
        clock.advance(0.25)
        metrics.worker_progressed(0, 1, still_busy=True)
        if clock.t == pytest.approx(1000.0 + METRICS_WINDOW_S + 0.5):
            metrics.worker_progressed(1, 1, still_busy=False)
    snap = metrics.snapshot()
    assert snap.workers[0].busy_share == pytest.approx(2.5 / snap.window_s)
    assert snap.workers[0].batch_s == pytest.approx(0.25)
    assert snap.workers[1].busy_share == pytest.approx(0.5 / snap.window_s)
    assert snap.workers[1].batch_s == pytest.approx(0.5)


def test_a_worker_stuck_on_one_batch_shows_busy_before_it_reports(clock):
    metrics = Metrics(clock)
    metrics.worker_assigned(3)
    clock.advance(METRICS_WINDOW_S * 3)
    snap = metrics.snapshot()
    assert snap.workers[3].busy_share == pytest.approx(1.0)
    assert snap.workers[3].batch_s is None  # nothing finished yet
    metrics.worker_gone(3)
    clock.advance(METRICS_WINDOW_S + 2 * BUCKET_S)
    assert 3 not in metrics.snapshot().workers


def test_ring_dry_share_counts_time_a_client_had_all_its_credit_back(clock):
    metrics = Metrics(clock)
    assert metrics.snapshot().ring_dry_share is None  # no client yet
    metrics.client_joined(b"a", 8)
    clock.advance(1.0)  # waiting for its first batches: dry
    metrics.client_credit(b"a", 0)
    clock.advance(3.0)  # holds 8 unread batches
    metrics.client_credit(b"a", 8)  # gave every one back: waits again
    clock.advance(1.0)
    assert metrics.snapshot().ring_dry_share == pytest.approx(2.0 / 5.0)
    metrics.client_left(b"a")
    clock.advance(2.0)  # no client: counts neither way
    assert metrics.snapshot().ring_dry_share == pytest.approx(2.0 / 5.0)


def test_memory_is_bounded_by_the_window_not_the_event_count(clock):
    metrics = Metrics(clock)
    metrics.worker_assigned(0)
    for _ in range(20_000):
        clock.advance(0.001)
        metrics.served(1)
        metrics.worker_progressed(0, 1, still_busy=True)
    assert len(metrics._buckets) == METRICS_WINDOW_S / BUCKET_S + 1
    snap = metrics.snapshot()
    assert snap.samples_per_s_window == pytest.approx(1000.0, rel=0.01)
    assert snap.workers[0].busy_share == pytest.approx(1.0)
    assert snap.workers[0].batch_s == pytest.approx(0.001, rel=0.01)


def test_bad_window_is_refused(clock):
    with pytest.raises(ValueError, match="bucket_s"):
        Metrics(clock, window_s=1.0, bucket_s=2.0)
