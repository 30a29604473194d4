"""The opt-in Prometheus endpoint of a real Service, scraped over HTTP and parsed as Prometheus does."""

import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import rgb_images
from prometheus_client.parser import text_string_to_metric_families

from ringfeed import Feed
from ringfeed.status import query_status
from ringfeed.server import Config, Service
from ringfeed.server.config import ConfigError
from ringfeed.server.prometheus import METRICS_REFRESH_S

SCRAPE_TIMEOUT_S = 5.0
SETTLE_S = 10 * METRICS_REFRESH_S  # how long a figure may take to reach the endpoint


def _scrape(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample the endpoint serves."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape_until(url: str, ok) -> dict:
    deadline = time.monotonic() + SETTLE_S
    while True:
        samples = _scrape(url)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(METRICS_REFRESH_S / 4)


def _served(samples: dict) -> float:
    return samples[("ringfeed_batches_served_total", ())]


def test_scrape_moves_as_a_feed_reads(name):
    config = Config(batch_size=8, workers=2, name=name, metrics_port=0, augment=({"op": "flip_lr"},), jit=False)
    with Service(config, features=rgb_images(64, 8), labels=np.arange(64)) as svc:
        url = query_status(svc.endpoint)["metrics_url"]
        assert url.startswith("http://127.0.0.1:")  # loopback only, unless metrics_host says otherwise
        before = _scrape_until(url, lambda s: s.get(("ringfeed_ready", ())) == 1)  # 0 while workers warm up
        assert before[("ringfeed_ready", ())] == 1 and _served(before) == 0
        assert before[("ringfeed_batch_size", ())] == 8 and before[("ringfeed_workers", ())] == 2
        with Feed(svc.endpoint) as feed:
            gen = feed.generator()
            for _ in range(20):
                next(gen)
            during = _scrape_until(url, lambda s: _served(s) >= 20 and s[("ringfeed_clients", ())] == 1)
            assert _served(during) >= 20 and during[("ringfeed_clients", ())] == 1
            assert during[("ringfeed_samples_served_total", ())] == 8 * _served(during)
            assert during[("ringfeed_samples_per_second", ())] > 0
            slots = {state: during[("ringfeed_ring_slots", (("state", state),))]
                     for state in ("free", "filling", "ready", "leased")}
            assert sum(slots.values()) == config.slots and slots["leased"] >= 1  # the feed holds some
            for worker in ("0", "1"):
                assert 0 <= during[("ringfeed_worker_busy_ratio", (("worker", worker),))] <= 1
            assert any(name == "ringfeed_worker_batch_seconds" and value > 0
                       for (name, _), value in during.items())
            assert 0 <= during[("ringfeed_ring_dry_ratio", ())] <= 1
            for _ in range(30):
                next(gen)
            after = _scrape_until(url, lambda s: _served(s) >= 50)
        assert _served(after) >= 50 and after[("ringfeed_worker_restarts_total", ())] == 0
        assert after[("ringfeed_samples_skipped_total", ())] == 0
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=SCRAPE_TIMEOUT_S)


def test_a_loader_bound_feed_shows_a_dry_ring_and_a_busy_worker(name):
    """Each batch costs the worker at least 4 x 20 ms and the feed asks for the next at once: the
    ring is dry most of the time (a sleeping feed notices a batch within POLL_S, 20 ms), and the
    worker's busy time covers every batch made."""
    batches, seconds_per_sample = 30, 0.02
    slow = ({"op": "python", "fn": "python_ops:slow", "kwargs": {"seconds": seconds_per_sample}},)
    config = Config(batch_size=4, workers=1, name=name, metrics_port=0, augment=slow, jit=False)
    with Service(config, features=rgb_images(64, 8), labels=np.arange(64)) as svc:
        url = query_status(svc.endpoint)["metrics_url"]
        with Feed(svc.endpoint) as feed:
            gen = feed.generator()
            for _ in range(batches):
                next(gen)
            samples = _scrape_until(url, lambda s: _served(s) >= batches)
            window_s = query_status(svc.endpoint)["metrics_window_s"]
    assert samples[("ringfeed_ring_dry_ratio", ())] > 0.5
    min_batch_s = 4 * seconds_per_sample
    assert samples[("ringfeed_worker_batch_seconds", (("worker", "0"),))] >= min_batch_s
    assert samples[("ringfeed_worker_busy_ratio", (("worker", "0"),))] * window_s >= batches * min_batch_s


def test_a_taken_port_fails_start_up_with_the_port(name):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = Config(batch_size=8, workers=1, name=name, metrics_port=port, jit=False)
        with pytest.raises(ConfigError, match=f"metrics_port: cannot listen on 127.0.0.1:{port}"):
            Service(config, features=rgb_images(16, 8), labels=np.arange(16)).start()


@pytest.mark.parametrize("options, message", [
    ({"metrics_port": 70000}, "metrics_port must be an integer from 0 to 65535"),
    ({"metrics_port": True}, "metrics_port must be an integer"),
    ({"metrics_port": 9100, "metrics_host": "0.0.0.0.0"}, "metrics_host must be an IP address or 'localhost'"),
])
def test_bad_metrics_options_are_refused_with_the_value(options, message):
    with pytest.raises(ConfigError, match=message):
        Config(**options)
