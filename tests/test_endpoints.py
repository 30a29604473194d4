"""Endpoint lists and patterns (client/endpoints.py), open_feed taking them, and Feed refusing several."""

import os

import numpy as np
import pytest
from conftest import expected_batches, rgb_images, take

from ringfeed import FanInFeed, Feed, open_feed
from ringfeed.endpoints import MAX_ENDPOINTS, expand_endpoints
from ringfeed.server import Config, Service


def test_a_range_expands_in_order_as_a_statefulset_names_its_pods():
    assert expand_endpoints("tcp://ringfeed-loader-{0..2}.ringfeed-loader:5555") == [
        "tcp://ringfeed-loader-0.ringfeed-loader:5555", "tcp://ringfeed-loader-1.ringfeed-loader:5555",
        "tcp://ringfeed-loader-2.ringfeed-loader:5555"]
    assert expand_endpoints("tcp://10.0.0.7:{5555..5557}") == [f"tcp://10.0.0.7:{p}" for p in (5555, 5556, 5557)]
    assert expand_endpoints("tcp://h-{3..3}:1") == ["tcp://h-3:1"]


def test_commas_keep_the_written_order_and_mix_with_ranges():
    assert expand_endpoints(" tcp://b:1 , tcp://a:1") == ["tcp://b:1", "tcp://a:1"]
    assert expand_endpoints("tcp://z:9,tcp://n{1..2}:9,ipc:///run/x.sock") == [
        "tcp://z:9", "tcp://n1:9", "tcp://n2:9", "ipc:///run/x.sock"]


def test_one_plain_endpoint_is_returned_as_it_is():
    assert expand_endpoints("ipc:///tmp/some folder/x.sock") == ["ipc:///tmp/some folder/x.sock"]


@pytest.mark.parametrize("text, message", [
    ("tcp://a:1,,tcp://b:1", "empty entry"),
    ("tcp://a:1,", "empty entry"),
    ("tcp://h{0..1}-{0..1}:1", "2 ranges"),
    ("tcp://h{2..0}:1", r"counts down"),
    ("tcp://h{a..b}:1", "brace"),
    ("tcp://h{0..2:1", "brace"),
    ("tcp://h}:1,tcp://g:1", "brace"),
    ("tcp://h{0,1}:1", "brace"),
    ("tcp://h{0..1}", "tcp://HOST:PORT"),
    ("udp://h{0..1}:1", "ipc://PATH or tcp://HOST:PORT"),
    (f"tcp://h{{0..{MAX_ENDPOINTS}}}:1", f"more than {MAX_ENDPOINTS}"),
    ("tcp://h{0..9999999}:1", "brace"),
])
def test_bad_patterns_are_clear_errors_naming_the_part(text, message):
    with pytest.raises(ValueError, match=message):
        expand_endpoints(text)


def test_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match="must be a string, got int"):
        expand_endpoints(5555)


@pytest.mark.parametrize("endpoints, error", [
    (["tcp://a:5555", "tcp://b:5555"], TypeError),
    (("tcp://a:5555",), TypeError),
    ("tcp://a:5555,tcp://b:5555", ValueError),
    ("tcp://ringfeed-loader-{0..2}.ringfeed-loader:5555", ValueError),
])
def test_a_feed_takes_one_endpoint_and_names_the_fan_in_for_several(endpoints, error):
    with pytest.raises(error, match=r"Feed takes one endpoint.*FanInFeed\(endpoints, \.\.\.\) or ringfeed\.open_feed"):
        Feed(endpoints)


def test_a_fan_in_takes_a_list_and_names_open_feed_for_a_pattern():
    with pytest.raises(ValueError, match=r"non-empty list of strings.*ringfeed\.open_feed takes"):
        FanInFeed("tcp://a:5555,tcp://b:5555")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        FanInFeed([])


def test_open_feed_fans_in_from_a_pattern_and_resolves_a_one_endpoint_pattern(name):
    images, labels = rgb_images(192, 12), np.arange(192)
    folder = os.environ["RINGFEED_RUNTIME_DIR"]
    services = [Service(Config(batch_size=16, workers=1, name=f"{name}{k}", seed=5,
                               endpoint=f"ipc://{folder}/{name}-{k}.sock"), features=images, labels=labels).start()
                for k in range(2)]
    try:
        with open_feed(f"ipc://{folder}/{name}-{{0..1}}.sock", timeout_s=10) as feed:
            assert isinstance(feed, FanInFeed)
            assert feed.endpoints == [s.endpoint for s in services]
            got = take(feed, 12)
        with open_feed(f"ipc://{folder}/{name}-{{1..1}}.sock", timeout_s=10) as single:
            assert isinstance(single, Feed) and single.endpoint == services[1].endpoint
            assert take(single, 1)[0][1].tobytes() == got[0][1].tobytes()
        with Feed(f"ipc://{folder}/{name}-{{1..1}}.sock", timeout_s=10) as single:  # one endpoint
            assert single.endpoint == services[1].endpoint
        with open_feed([services[1].endpoint], timeout_s=10) as listed:  # a list is a fan-in, of one here
            assert isinstance(listed, FanInFeed) and listed.endpoints == [services[1].endpoint]
    finally:
        for svc in services:
            svc.stop()
    expected = expected_batches(services[0].config, images, labels, 12)
    for (x, y), (ex, ey) in zip(got, expected):  # the stream one server gives
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)
