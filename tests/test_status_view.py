"""The text ``ringfeed status`` and ``status --watch`` against a real ``ringfeed start`` service:
the watch view runs under a pseudo-terminal, redraws in place, stops on Ctrl-C (exit 0) and says
so when the server goes away (exit 1)."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from conftest import default_sigint, rgb_images

from ringfeed import Feed
from ringfeed.paths import default_endpoint
from ringfeed.status import query_status
from ringfeed.server import cli
from ringfeed.server.status_view import CLEAR, StatusError, render

RINGFEED = [sys.executable, "-m", "ringfeed.server.cli"]
COMMAND_TIMEOUT_S = 120.0
WATCH_TIMEOUT_S = 30.0
INTERVAL_S = 0.2


def ringfeed(*args):
    return subprocess.run([*RINGFEED, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)



def test_a_status_reply_larger_than_a_json_frame_is_never_held():
    """A peer that answers STATUS with a huge frame is cut off by the socket (MAXMSGSIZE) before
    the client holds it: the query is unanswered within its timeout."""
    import threading

    import zmq

    from ringfeed import protocol

    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")

    def answer():
        if fake.poll(COMMAND_TIMEOUT_S * 1000):
            identity, _ = fake.recv_multipart()
            fake.send_multipart([identity, protocol.STATUS, b"{" + b" " * (8 * protocol.MAX_JSON_BYTES) + b"}"])

    replier = threading.Thread(target=answer, daemon=True)
    replier.start()
    try:
        started = time.monotonic()
        assert query_status(f"tcp://127.0.0.1:{port}", timeout_s=2.0) is None
        assert time.monotonic() - started < 2.0 + 1.0
    finally:
        replier.join(COMMAND_TIMEOUT_S)
        fake.close(0)

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A background service that has served 12 batches, its data folder, name and status reply
    (``test_watch...`` stops it: it runs last)."""
    tmp_path, name = tmp_path_factory.mktemp("data"), "t" + uuid.uuid4().hex[:10]
    np.save(tmp_path / "features.npy", rgb_images(64, 8))
    np.save(tmp_path / "labels.npy", np.arange(64))
    config = tmp_path / "ringfeed.toml"
    config.write_text('jit = false\n\n[[augment]]\nop = "flip_lr"\n')
    started = ringfeed("start", "--config", str(config), "--data", str(tmp_path), "--batch-size", "8",
                       "--workers", "1", "--name", name)
    assert started.returncode == 0, started.stderr
    try:
        with Feed(name=name) as feed:
            gen = feed.generator()
            for _ in range(12):
                next(gen)
        yield str(tmp_path), name, query_status(default_endpoint(name))
    finally:
        cli.main(["stop", "--name", name])  # idempotent: the watch test stops it too


class Watch:
    """``ringfeed status --watch`` on a pseudo-terminal: what it drew, and its exit."""

    def __init__(self, name: str):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([*RINGFEED, "status", "--name", name, "--watch", "--interval-s",
                                      str(INTERVAL_S)], stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=default_sigint)
        os.close(slave)
        self.screen = b""

    def read_until(self, done) -> str:
        deadline = time.monotonic() + WATCH_TIMEOUT_S
        while not done(self.screen.decode(errors="replace")) and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # the terminal closed: the command exited
                    break
        return self.screen.decode(errors="replace")

    def wait(self) -> int:
        """The exit status, once the command has exited and everything it wrote is read."""
        try:
            return self.proc.wait(WATCH_TIMEOUT_S)
        finally:
            while select.select([self.master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the terminal closed
                    break
                if not chunk:
                    break
                self.screen += chunk
            os.close(self.master)


def test_text_status_names_what_is_made_and_how_fast(served):
    data, _, status = served
    text = render(status)
    assert f"data           {data}" in text
    assert "batch size     8 (8 batches per epoch)" in text
    assert "fields         features (8, 8, 8, 3) uint8; labels (8,) int64" in text
    assert "pipeline       flip_lr" in text
    assert re.search(r"uptime         \d+m \d\ds", text)
    rates = re.search(r"samples/s      ([\d,]+) over the last (\d+) s, ([\d,]+) since start", text)
    assert rates and int(rates.group(1).replace(",", "")) > 0 and int(rates.group(3).replace(",", "")) > 0
    assert re.search(r"worker 0 +pid \d+ +busy +\d+%  batch [\d.]+ ms", text)
    assert status["batches_served"] >= 12 and f"batches served {status['batches_served']:,}" in text
    assert f"slots          {status['slots']['total']}: " in text and "skipped        0 samples" in text


def test_render_refuses_a_reply_with_a_wrong_type_and_escapes_control_characters(served):
    _, _, status = served
    with pytest.raises(StatusError, match="'uptime_s' should be int or float, got 'soon'"):
        render({**status, "uptime_s": "soon"})
    with pytest.raises(StatusError, match="'samples_per_s_window' should be int or float, got nan"):
        render({**status, "samples_per_s_window": float("nan")})
    with pytest.raises(StatusError, match="'per_worker' should list objects"):
        render({**status, "per_worker": [7]})
    text = render({**status, "pipeline": ["flip\x1b[2J"]})
    assert "\x1b" not in text and "flip\\x1b[2J" in text


def test_watch_refuses_json_and_a_too_short_interval(served, capsys):
    assert cli.main(["status", "--name", served[1], "--watch", "--json"]) == 2
    assert "--watch redraws the text status; it does not go with --json" in capsys.readouterr().err
    assert cli.main(["status", "--name", served[1], "--watch", "--interval-s", "0"]) == 2
    assert "--interval-s must be at least 0.1, got 0.0" in capsys.readouterr().err


def test_the_text_status_command_prints_the_new_lines(served, capsys):
    assert cli.main(["status", "--name", served[1]]) == 0
    shown = capsys.readouterr().out
    for line in ("data", "batch size", "fields", "pipeline", "uptime", "samples/s", "ring dry", "  worker 0"):
        assert f"\n  {line} " in shown, shown


def test_watch_redraws_in_place_until_ctrl_c_then_says_when_the_server_goes(served):
    name = served[1]
    watch = Watch(name)
    screen = watch.read_until(lambda s: s.count("samples/s") >= 3)
    watch.proc.send_signal(signal.SIGINT)
    assert watch.wait() == 0, screen
    assert screen.count(CLEAR) >= 3 and screen.count("samples/s") >= 3  # one screen per refresh
    assert screen.count("batches served") == screen.count(CLEAR)  # nothing scrolls between them
    gone = Watch(name)
    gone.read_until(lambda s: CLEAR in s)
    assert cli.main(["stop", "--name", name]) == 0
    assert gone.wait() == 1
    assert "the server went away" in gone.screen.decode(errors="replace")

