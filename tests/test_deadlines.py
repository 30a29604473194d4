"""The task deadline's bookkeeping, without processes: times are arguments."""

import logging

from ringfeed.server.deadlines import TASK_TIMEOUT_FACTOR, ProgressClock
from ringfeed.server.ratelimit import LogLimiter


def test_an_idle_worker_is_never_overdue_and_a_busy_one_is_past_the_floor():
    clock = ProgressClock(floor_s=2.0)
    assert clock.overdue(100.0) == []
    clock.assigned(0, now=10.0)
    clock.assigned(0, now=11.0)  # more tasks for a busy worker do not restart its clock
    assert clock.overdue(11.9) == []
    assert clock.overdue(12.5) == [(0, 2.5)]


def test_progress_restarts_the_clock_and_an_idle_worker_stops_it():
    clock = ProgressClock(floor_s=2.0)
    clock.assigned(1, now=0.0)
    clock.progressed(1, batches=1, now=1.5, still_busy=True)
    assert clock.overdue(3.0) == []  # 1.5 s since its last report
    clock.progressed(1, batches=1, now=3.0, still_busy=False)
    assert clock.overdue(100.0) == []


def test_the_deadline_follows_the_median_time_per_batch_above_the_floor():
    clock = ProgressClock(floor_s=1.0)
    assert clock.deadline_s == 1.0
    clock.assigned(0, now=0.0)
    for k in range(1, 6):  # reports of 2 batches each, 1 s apart: 0.5 s a batch
        clock.progressed(0, batches=2, now=float(k), still_busy=True)
    assert clock.deadline_s == TASK_TIMEOUT_FACTOR * 0.5
    assert clock.overdue(5.0 + 4.9) == []
    assert clock.overdue(5.0 + 5.1) == [(0, 5.1)]


def test_a_forgotten_worker_is_not_reported_again():
    clock = ProgressClock(floor_s=1.0)
    clock.assigned(3, now=0.0)
    clock.forget(3)
    assert clock.overdue(10.0) == []


def test_the_log_limiter_holds_back_and_counts(caplog):
    limiter = LogLimiter(logging.getLogger("ringfeed.test"), every_s=3600)
    with caplog.at_level(logging.WARNING, "ringfeed.test"):
        for k in range(5):
            limiter.log(logging.WARNING, "client %d gone", k)
    assert [r.getMessage() for r in caplog.records] == ["client 0 gone"]
    limiter.every_s = 0.0
    with caplog.at_level(logging.WARNING, "ringfeed.test"):
        limiter.log(logging.WARNING, "client %d gone", 5)
    assert caplog.records[-1].getMessage() == "client 5 gone (and 4 more like it since the last such message)"
