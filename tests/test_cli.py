"""The ringfeed command from a shell: start, status --json, stop, serve, cleanup."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import segments_of

from client import Feed
from loader_server import shm

RINGFEED = [sys.executable, "-m", "loader_server.cli"]


def ringfeed(*args, timeout=120):
    return subprocess.run([*RINGFEED, *args], capture_output=True, text=True, timeout=timeout)


def _data(tmp_path, n=64):
    np.save(tmp_path / "features.npy", np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(n))
    return str(tmp_path)


def test_start_status_stop(tmp_path, name):
    config = tmp_path / "ringfeed.toml"
    config.write_text('batch_size = 4\nworkers = 2\n\n[[augment]]\nop = "random_crop"\nsize = [12, 12]\n'
                      '\n[[augment]]\nop = "flip_lr"\n')
    started = ringfeed("start", "--config", str(config), "--data", _data(tmp_path), "--batch-size", "8",
                       "--name", name)
    assert started.returncode == 0, started.stderr
    pid = int(re.search(r"pid (\d+)", started.stdout).group(1))
    status = json.loads(ringfeed("status", "--name", name, "--json").stdout)
    assert status["running"] and status["workers"] == 2 and status["batch_size"] == 8
    assert status["slots"]["free"] == status["slots"]["total"]
    with Feed(name=name) as feed:
        assert feed.spec.field("features").shape == (12, 12, 3) and feed.spec.field("features").dtype == np.uint8
        for _, batch in zip(range(5), feed.generator()):
            assert batch[0].shape == (8, 12, 12, 3)
    status = json.loads(ringfeed("status", "--name", name, "--json").stdout)
    assert status["batches_served"] >= 5 and status["samples_per_s"] > 0
    human = ringfeed("status", "--name", name)
    assert "batches served" in human.stdout and human.returncode == 0
    assert segments_of(pid)
    stopped = ringfeed("stop", "--name", name)
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert not segments_of(pid)
    assert "not running" in ringfeed("stop", "--name", name).stdout  # idempotent
    after = ringfeed("status", "--name", name, "--json")
    assert after.returncode == 1 and json.loads(after.stdout)["running"] is False


def test_start_refuses_bad_config_with_the_value(tmp_path, name):
    bad = ringfeed("start", "--data", _data(tmp_path), "--batch-size", "0", "--name", name)
    assert bad.returncode == 2 and "batch_size must be an integer >= 1, got 0" in bad.stderr
    missing = ringfeed("start", "--data", str(tmp_path / "nope"), "--name", name)
    assert missing.returncode == 2 and "nope' does not exist" in missing.stderr


def test_foreground_serve_stops_cleanly_on_sigterm(tmp_path, name):
    proc = subprocess.Popen([*RINGFEED, "serve", "--data", _data(tmp_path), "--batch-size", "4",
                             "--workers", "1", "--name", name], stderr=subprocess.PIPE, text=True)
    try:
        with Feed(name=name, timeout_s=60) as feed:
            next(feed.generator())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert not segments_of(proc.pid)
    assert "stopping" in proc.stderr.read()


def test_cleanup_removes_segments_of_dead_servers():
    stale = shm.segment_name(2**22 + 4321, "0bad", "ring")
    shm.create(stale, 4096)[0].close()
    out = ringfeed("cleanup")
    assert out.returncode == 0 and stale in out.stdout
    assert not os.path.exists(f"/dev/shm/{stale}")


def test_ipc_socket_is_owner_only(tmp_path, name):
    proc = subprocess.Popen([*RINGFEED, "serve", "--data", _data(tmp_path), "--batch-size", "4",
                             "--workers", "1", "--name", name], stderr=subprocess.DEVNULL)
    try:
        sock = os.path.join(os.environ["RINGFEED_RUNTIME_DIR"], f"{name}.sock")
        deadline = time.monotonic() + 60
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700
    finally:
        proc.terminate()
        proc.wait(timeout=20)
