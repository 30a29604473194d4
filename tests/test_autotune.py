"""workers = "auto": the tuner on a fake clock, the broker's events, and a real service's stream."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from ringfeed import Feed
from ringfeed.status import query_status
from conftest import expected_batches, rgb_images, take
from ringfeed.server import Config, ConfigError, Service
from ringfeed.server.autotune import DROP_BUSY, DROP_WINDOWS, WINDOW_S, AutoWorkers, Observation, WorkerTuner
from ringfeed.server.metrics import Metrics

TICK_S = 0.125  # exact in binary: windows of the fake clock end on a tick


class Loader:
    """A loader whose workers each make ``rate`` batches/s for a trainer that wants ``demand``
    batches/s: per tick, what the broker would see."""

    def __init__(self, max_workers: int, rate: float = 100.0):
        self.now = 0.0
        self.rate = rate
        self.made = 0.0  # batches made so far, fractions included
        self.tuner = WorkerTuner(max_workers, self.now)
        self.history: list[int] = []

    def run(self, demand: float, seconds: float, free: int = 16) -> None:
        for _ in range(round(seconds / TICK_S)):
            self.now += TICK_S
            n = self.tuner.active
            made = min(demand, n * self.rate) * TICK_S
            busy = made / self.rate / n  # the work spreads over the active workers
            finished = int(self.made + made) - int(self.made)
            self.made += made
            seen = Observation({w: busy for w in range(n)}, finished, demand > n * self.rate, free)
            self.history.append(self.tuner.observe(self.now, seen))


def test_speeds_up_to_the_workers_a_fast_trainer_needs():
    loader = Loader(max_workers=8)
    loader.run(demand=350.0, seconds=10)  # 3.5 workers' worth
    assert loader.tuner.active == 4
    assert loader.history.index(4) <= 4 * round(WINDOW_S / TICK_S) + 1  # one worker added per window
    assert max(loader.history) == 4


def test_slows_down_when_the_trainer_does_and_keeps_up():
    loader = Loader(max_workers=8)
    loader.run(demand=350.0, seconds=10)
    assert loader.tuner.active == 4
    loader.run(demand=120.0, seconds=30)  # 1.2 workers' worth: two keep up, one does not
    slower = loader.history[round(10 / TICK_S):]
    assert min(slower) == 2 and slower[-round(15 / TICK_S):] == [2] * round(15 / TICK_S)


@pytest.mark.parametrize("demand", [55.0, 150.0, 190.0, 260.0])
def test_steady_load_settles_without_oscillating(demand):
    loader = Loader(max_workers=8)
    loader.run(demand=demand, seconds=120)
    settled = loader.history[-round(90 / TICK_S):]
    assert len(set(settled)) == 1, f"active workers moved in steady state: {sorted(set(settled))}"
    n = settled[0]
    assert n * loader.rate >= demand  # it keeps up
    assert n == 1 or demand > DROP_BUSY * (n - 1) * loader.rate  # and one fewer would not do


def test_never_above_max_workers_nor_below_one():
    loader = Loader(max_workers=3)
    loader.run(demand=10_000.0, seconds=20)
    assert max(loader.history) == 3 and loader.tuner.active == 3
    loader.run(demand=1.0, seconds=60)
    assert min(loader.history) == 1 and loader.tuner.active == 1
    with pytest.raises(ValueError, match="max_workers must be at least 1, got 0"):
        WorkerTuner(0, 0.0)


def test_a_window_without_batches_changes_nothing():
    loader = Loader(max_workers=4)
    loader.run(demand=350.0, seconds=10)
    loader.run(demand=0.0, seconds=60)  # nobody reads (validation, between rounds): hold
    assert set(loader.history[-round(60 / TICK_S):]) == {4}


def test_no_free_slot_adds_no_worker():
    loader = Loader(max_workers=4)
    loader.run(demand=350.0, seconds=10, free=0)
    assert loader.tuner.active == 1


def test_a_drop_that_an_add_undoes_makes_the_next_drop_wait_longer():
    tuner, now = WorkerTuner(2, 0.0, start=2), 0.0

    def window(busy_s: float, dry: bool) -> int:
        nonlocal now
        now += WINDOW_S
        return tuner.observe(now, Observation({0: busy_s}, 10, dry, 8))

    for _ in range(DROP_WINDOWS):
        active = window(busy_s=0.5, dry=False)
    assert active == 1
    assert window(busy_s=0.95, dry=True) == 2
    assert tuner.drop_windows == 2 * DROP_WINDOWS
    assert [window(busy_s=0.5, dry=False) for _ in range(2 * DROP_WINDOWS)][-2:] == [2, 1]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_interval_counts_time_with_tasks_in_flight():
    clock = Clock()
    metrics = Metrics(clock)
    clock.now = 1.0
    metrics.worker_assigned(0)
    clock.now = 1.5
    metrics.worker_assigned(0)  # more tasks while busy: still busy since 1.0
    clock.now = 2.0
    metrics.worker_assigned(1)
    clock.now = 2.5
    metrics.worker_progressed(0, 3, still_busy=False)
    clock.now = 3.0
    assert metrics.take_interval().busy_s == {0: 1.5, 1: 1.0}
    clock.now = 3.25
    metrics.worker_progressed(1, 1, still_busy=False)
    clock.now = 4.0
    assert metrics.take_interval().busy_s == {1: 0.25}
    clock.now = 5.0
    assert metrics.take_interval().busy_s == {}


def test_auto_workers_sees_a_client_whose_credit_is_all_back_as_dry():
    clock = Clock()
    metrics, auto = Metrics(clock), AutoWorkers(3, 0.0)
    metrics.client_joined(b"c", 16)

    def window(credit: int, client: bytes = b"c") -> int:
        for _ in range(round(WINDOW_S / TICK_S)):
            clock.now += TICK_S
            for worker in range(auto.active):  # every active worker busy all along
                metrics.worker_assigned(worker)
            metrics.client_credit(client, credit)
            auto.tick(clock.now, served=round(clock.now * 100), free=8, interval=metrics.take_interval())
        return auto.active

    assert window(credit=8) == 1  # busy, but the client always had batches: not dry
    assert window(credit=16) == 2  # all its credit back: it waited
    assert window(credit=8) == 2  # the batches flow again: one more is kept for now
    metrics.client_left(b"c")
    assert window(credit=16) == 2  # a client that left waits for nothing
    assert window(credit=16, client=b"stranger") == 2  # nor does one the broker never welcomed


def test_config_workers_auto_and_max_workers():
    config = Config(workers="auto", max_workers=3)
    assert config.worker_processes == 3 and config.slots == max(32, 4 * 3 + 8)
    assert Config(workers=2, max_workers=5).worker_processes == 2
    message = r"workers must be an integer >= 1, got 'many' \(or 'auto', to autotune how many are busy\)"
    with pytest.raises(ConfigError, match=message):
        Config(workers="many")
    with pytest.raises(ConfigError, match=r"max_workers must be an integer >= 1, got 0"):
        Config(workers="auto", max_workers=0)


def test_auto_service_stream_is_byte_identical_and_adds_workers(name):
    """A consumer faster than one worker: the tuner adds the second, and the batches made
    before and after are those that one worker makes with the same seed."""
    images, labels = rgb_images(2048, 32), np.arange(2048, dtype=np.int64)
    augment = ({"op": "random_crop", "size": [28, 28]}, {"op": "flip_lr"},
               {"op": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    config = Config(batch_size=128, workers="auto", max_workers=2, seed=7, name=name, augment=augment)
    with Service(config, features=images, labels=labels) as svc:
        assert query_status(svc.endpoint)["workers_active"] == 1
        with Feed(svc.endpoint) as feed:
            first = take(feed, 16)
            skipped, deadline = 0, time.monotonic() + 30
            gen = feed.generator()
            while query_status(svc.endpoint)["workers_active"] < 2 and time.monotonic() < deadline:
                for _ in range(50):  # as fast as it goes: no copy
                    next(gen)
                skipped += 50
            status = query_status(svc.endpoint)
            later = take(feed, 16)
    assert status["workers_active"] == 2 and status["workers_auto"] and status["workers_configured"] == 2
    assert len(status["workers_ready"]) == 2
    expected = expected_batches(replace(config, workers=1), images, labels, 32 + skipped)
    for k, ((x, y), (ex, ey)) in enumerate(zip(first + later, expected[:16] + expected[16 + skipped:])):
        assert x.tobytes() == ex.tobytes() and y.tobytes() == ey.tobytes(), f"batch {k} differs"


def test_cli_flags_workers_auto_and_max_workers(capsys):
    from ringfeed.server import cli

    args = cli.build_parser().parse_args(["start", "--workers", "auto", "--max-workers", "3"])
    config = cli._config_from(args)
    assert config.workers == "auto" and config.worker_processes == 3
    resolved = config.to_json()  # what the detached server is started with
    assert resolved["workers"] == "auto" and resolved["max_workers"] == 3
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["start", "--workers", "some"])
    assert exit_.value.code == 2
    assert "argument --workers: expected a whole number or 'auto', got 'some'" in capsys.readouterr().err
