"""The ringfeed command from a shell: start, status --json, stop, serve, cleanup."""

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import default_sigint, free_port, segments_of

from ringfeed import Feed, paths
from ringfeed.status import query_status
from ringfeed.server import background, shm
from ringfeed.server.cli import build_parser
from ringfeed.server.config import ON_ERROR_MODES, SAMPLING_MODES, Config, ConfigError, load_config, load_toml
from ringfeed.server.sampler import Sampler

RINGFEED = [sys.executable, "-m", "ringfeed.server.cli"]


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


def test_start_hands_its_server_the_resolved_config_as_a_file(tmp_path, name):
    """Relative paths, defaults and flags are resolved once, in ``start``; the server reads that
    file (``serve --config X.config.json``), so what runs is what was validated."""
    _data(tmp_path)
    toml = tmp_path / "ringfeed.toml"
    toml.write_text('batch_size = 4\nworkers = 1\n\n[[augment]]\nop = "flip_lr"\n')
    started = subprocess.run([*RINGFEED, "start", "--config", "ringfeed.toml", "--data", ".", "--batch-size",
                              "8", "--name", name], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    try:
        path = paths.config_file(name)
        assert path.stat().st_mode & 0o777 == 0o600
        resolved = json.loads(path.read_text())
        assert resolved["data"] == str(tmp_path) and resolved["batch_size"] == 8 and resolved["workers"] == 1
        assert resolved["endpoint"] == paths.default_endpoint(name) and resolved["slots"] == 32
        assert resolved["augment"] == [{"op": "flip_lr"}]
        assert load_config(path) == dataclasses.replace(load_toml(toml, batch_size=8, name=name), data=str(tmp_path))
        pid = background.read_state(name)["pid"]
        assert f"serve --config {path}" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    finally:
        assert ringfeed("stop", "--name", name).returncode == 0


def test_a_resolved_config_file_that_is_not_an_object_is_refused(tmp_path):
    bad = tmp_path / "x.config.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, expected an object"):
        load_config(bad)
    bad.write_text('{"batch_size": 0}')
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(bad)
    bad.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(bad)


def test_start_refuses_bad_config_with_the_value(tmp_path, name):
    bad = ringfeed("start", "--data", _data(tmp_path), "--batch-size", "0", "--name", name)
    assert bad.returncode == 2 and "batch_size must be an integer >= 1, got 0" in bad.stderr
    missing = ringfeed("start", "--data", str(tmp_path / "nope"), "--name", name)
    assert missing.returncode == 2 and "nope' does not exist" in missing.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_serve_stops_cleanly_on_sigterm_and_sigint(tmp_path, name, signum):
    proc = subprocess.Popen([*RINGFEED, "serve", "--data", _data(tmp_path), "--batch-size", "4",
                             "--workers", "1", "--name", name], stderr=subprocess.PIPE, text=True)
    try:
        with Feed(name=name, timeout_s=60) as feed:
            next(feed.generator())
        proc.send_signal(signum)
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


# -- the command line at daemon grade (issue #15, point 5) ------------------------------

def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def _log_of(name: str) -> str:
    return (Path(os.environ["RINGFEED_RUNTIME_DIR"]) / f"{name}.log").read_text()


def test_version_is_the_package_metadata():
    out = ringfeed("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ringfeed {metadata.version('ringfeed')}"


def test_every_flag_has_help_with_its_default_and_choices():
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for command, sub in subcommands.choices.items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            checked += 1
            flag = f"ringfeed {command} {action.option_strings[-1]}"
            assert action.help, f"{flag} has no help"
            assert isinstance(action, argparse._StoreTrueAction) or "default" in action.help, \
                f"{flag}: its help does not state the default: {action.help!r}"
    assert checked >= 25
    start = {a.dest: a for a in subcommands.choices["start"]._actions}
    assert tuple(start["sampling"].choices) == SAMPLING_MODES and tuple(start["on_error"].choices) == ON_ERROR_MODES
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for option in ("batch_size", "seed", "sampling", "on_error"):  # taken from Config, not written twice
        assert f"(default: {defaults[option]})" in start[option].help
    refused = ringfeed("start", "--sampling", "sorted", "--data", ".")
    assert refused.returncode == 2 and "invalid choice: 'sorted'" in refused.stderr


def _lines_with(name: str, text: str) -> list[str]:
    return [line for line in _log_of(name).splitlines() if text in line]


def test_a_tcp_service_by_name_goodbyes_and_stop_by_endpoint(tmp_path, name):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = ringfeed("start", "--data", _data(tmp_path), "--batch-size", "8", "--workers", "1",
                       "--endpoint", endpoint, "--name", name)
    assert started.returncode == 0, started.stderr
    try:
        with Feed(name=name) as feed:  # the endpoint comes from the state file: TCP, not the ipc default
            assert feed.endpoint == endpoint
            assert next(feed.generator())[0].shape == (8, 16, 16, 3)
        assert _wait_for(lambda: _lines_with(name, " left; "))
        assert " INFO client " in _lines_with(name, " left; ")[0] and not _lines_with(name, " gone")
        vanish = f"import os\nfrom client import Feed\nnext(Feed(name={name!r}).generator())\nos._exit(0)\n"
        assert subprocess.run([sys.executable, "-c", vanish], timeout=60).returncode == 0
        assert _wait_for(lambda: _lines_with(name, " gone, silent for "))
        assert " WARNING client " in _lines_with(name, " gone, silent for ")[0]
        assert len(_lines_with(name, " left; ")) == 1  # the client that vanished said nothing
        unknown = ringfeed("stop", "--endpoint", "tcp://127.0.0.1:1")
        assert unknown.returncode == 2 and "no running ringfeed service listens at 'tcp://127.0.0.1:1'" \
            in unknown.stderr
        stopped = ringfeed("stop", "--endpoint", endpoint)
        assert stopped.returncode == 0 and f"ringfeed {name!r} stopped" in stopped.stdout
    finally:
        background.stop(name)  # at once if the stop above did its work
    assert query_status(endpoint, timeout_s=0.5) is None


def test_a_failed_start_prints_this_starts_error_first(tmp_path, name):
    data = _data(tmp_path)
    earlier = ringfeed("start", "--data", str(tmp_path / "nope"), "--name", name)
    assert earlier.returncode == 2 and "does not exist" in earlier.stderr
    failed = ringfeed("start", "--data", data, "--batch-size", "8", "--steps-per-epoch", "9", "--name", name)
    assert failed.returncode == 2
    first = failed.stderr.splitlines()[0]
    assert first.startswith("ringfeed: error: ringfeed server exited with code 2 during start-up: ")
    assert first.endswith("steps_per_epoch 9 is more than an epoch holds: 64 samples in batches of 8 make "
                          "at most 8 (N // batch_size) when shuffling")
    assert "does not exist" not in failed.stderr  # the earlier start's error stays in the log only
    assert "does not exist" in _log_of(name)


def test_steps_per_epoch_is_refused_past_an_epoch_in_shuffle_mode_only():
    with pytest.raises(ConfigError, match="steps_per_epoch 11 is more than an epoch holds: 103 samples in "
                       r"batches of 10 make at most 10 \(N // batch_size\)"):
        Sampler(103, 10, 0, "shuffle", steps_per_epoch=11)
    assert Sampler(103, 10, 0, "shuffle", steps_per_epoch=10).steps_per_epoch == 10
    assert Sampler(103, 10, 0, "replacement", steps_per_epoch=50).steps_per_epoch == 50


def test_status_answers_at_once_for_a_missing_socket(name):
    missing = f"ipc://{os.environ['RINGFEED_RUNTIME_DIR']}/{name}.sock"
    started = time.monotonic()
    assert query_status(missing, timeout_s=30) is None
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    out = ringfeed("status", "--name", name, "--timeout-s", "30")
    assert out.returncode == 1 and "not running" in out.stdout
    assert time.monotonic() - started < 10  # the process start, not the 30 s timeout


@pytest.mark.parametrize("endpoint", ["bogus", "tcp://host", "tcp://host:http", "udp://127.0.0.1:5555",
                                      "ipc://"])
def test_a_bad_endpoint_is_a_one_line_error(endpoint):
    out = ringfeed("status", "--endpoint", endpoint, "--timeout-s", "0.5")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("ringfeed: error: endpoint must be ")
    assert "tcp://HOST:PORT" in out.stderr and out.stderr.endswith(f", got {endpoint!r}\n")


def test_a_ctrl_c_to_the_trainers_process_group_leaves_its_service_running(name):
    # start_new_session: the SIGINT the trainer sends its own group does not reach this test
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "sigint_trainer.py"), name],
                          capture_output=True, text=True, timeout=120, start_new_session=True,
                          preexec_fn=default_sigint)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("before ") and lines[1] == "interrupted"
    assert lines[2].startswith("after 24 batches; ") and lines[3] == "status ready"


def test_an_untrusted_state_file_is_neither_followed_nor_signalled(name):
    path = Path(os.environ["RINGFEED_RUNTIME_DIR"]) / f"{name}.json"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        path.write_text(json.dumps({"pid": bystander.pid, "endpoint": endpoint, "name": name}))
        path.chmod(0o620)  # group-writable: anyone in the group could point it anywhere
        with pytest.raises(PermissionError, match="writable by group"):
            Feed(name=name, timeout_s=1.0)
        refused = ringfeed("stop", "--endpoint", endpoint)
        assert refused.returncode == 2 and "writable by group" in refused.stderr
        assert bystander.poll() is None and path.exists()
    finally:
        bystander.kill()
        bystander.wait()
        path.unlink(missing_ok=True)


def test_a_state_file_naming_the_reader_itself_is_an_earlier_lifes(name):
    """A restarted container gives its server the pid of the one before, whose state file
    survived: a server reading a file that names its own pid must not refuse to start."""
    path = Path(os.environ["RINGFEED_RUNTIME_DIR"]) / f"{name}.json"
    path.write_text(json.dumps({"pid": os.getpid(), "endpoint": "ipc:///nowhere.sock", "name": name}))
    path.chmod(0o600)
    assert background.read_state(name) is None and not path.exists()
