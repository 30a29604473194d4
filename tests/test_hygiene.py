"""Server hygiene with real files and processes: segments allocated for real, stale rules,
identity checks on reopen, no imports from the caller's folder, one server per name, names
checked, .npz headers checked before loading, and CURVE keys revoked without a restart."""

import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, rgb_images

from ringfeed import Feed, RingfeedError
from ringfeed.paths import pid_namespace_id
from ringfeed.server import shm, sources
from ringfeed.server.auth import generate_keys
from ringfeed.server.config import ConfigError
from ringfeed.server.procs import pid_alive
from ringfeed.server.ring import Ring, plan_layout
from ringfeed.server.connections import cleartext_readers

RINGFEED = [sys.executable, "-m", "ringfeed.server.cli"]
DEAD_PID = 2**22 + 777  # above pid_max: never a live process
NOBODY = 65534
SERVER_START_TIMEOUT_S = 90.0
SERVER_STOP_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 120.0
MiB = 2**20


def _data(folder: Path, n: int = 32) -> str:
    folder.mkdir(exist_ok=True)
    np.save(folder / "features.npy", rgb_images(n, 8))
    np.save(folder / "labels.npy", np.arange(n))
    return str(folder)


def _runtime() -> Path:
    return Path(os.environ["RINGFEED_RUNTIME_DIR"])


def _wait_for_state(name: str, pid: int) -> dict:
    """The state file of server ``pid`` once it is ready."""
    path = _runtime() / f"{name}.json"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            state = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("pid") == pid:
            return state
        time.sleep(0.1)
    raise TimeoutError(f"server {pid} wrote no state file {path} within {SERVER_START_TIMEOUT_S} s")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=SERVER_STOP_TIMEOUT_S)[1] or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=SERVER_STOP_TIMEOUT_S)[1] or ""


# 1. segments are allocated for real

def test_create_allocates_every_byte():
    name = shm.segment_name(os.getpid(), "alloc", "ring")
    mm, _ = shm.create(name, 8 * MiB)
    try:
        assert os.stat(shm.SHM_DIR / name).st_blocks * 512 >= 8 * MiB
    finally:
        mm.close()
        shm.unlink(name)


@pytest.fixture
def small_shm(tmp_path, monkeypatch):
    """A real 8 MiB tmpfs as the segments' folder."""
    folder = tmp_path / "shm"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    monkeypatch.setattr(shm, "SHM_DIR", folder)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_segments_that_together_exceed_the_tmpfs_are_refused_by_name_and_leave_no_file(small_shm):
    first, second = (shm.segment_name(os.getpid(), token, "ring") for token in ("first", "second"))
    mm, _ = shm.create(first, 5 * MiB)  # fits; sparse files would let the second "fit" too
    try:
        with pytest.raises(ConfigError) as err:
            shm.create(second, 5 * MiB)
        message = str(err.value)
        assert f"segment {small_shm / second} needs {5 * MiB} bytes" in message
        assert f"has {shm.free_bytes()} bytes free" in message
        assert not (small_shm / second).exists()
    finally:
        mm.close()
        shm.unlink(first)


# 2. stale detection

def _plant(name: str) -> Path:
    mm, _ = shm.create(name, 4096)
    mm.close()
    return shm.SHM_DIR / name


def test_remove_stale_removes_only_dead_segments_of_ours():
    ours = _plant(shm.segment_name(DEAD_PID, "deadours", "ring"))
    other_namespace = _plant(f"{shm.SHM_PREFIX}-{pid_namespace_id() + 1}-{DEAD_PID}-othrns-ring")
    other_uid = _plant(shm.segment_name(DEAD_PID, "othruid", "data"))
    os.chown(other_uid, NOBODY, NOBODY)
    link = shm.SHM_DIR / shm.segment_name(DEAD_PID, "alink", "ring")
    link.symlink_to(ours.name)
    try:
        removed = shm.remove_stale()
        assert ours.name in removed and not ours.exists()
        assert other_namespace.exists() and other_uid.exists() and link.is_symlink()
        assert {other_namespace.name, other_uid.name, link.name}.isdisjoint(removed)
    finally:
        for path in (ours, other_namespace, other_uid, link):
            path.unlink(missing_ok=True)


# 3. workers check owner and inode on reopen

def test_attach_refuses_a_replaced_ring_segment():
    layout = plan_layout(shm.segment_name(os.getpid(), "swap", "ring"), 2,
                         {"features": ((2, 4), np.uint8), "labels": ((2,), np.int64)})
    ring = Ring(layout, create=True)
    path = shm.SHM_DIR / layout.segment
    try:
        worker_view = Ring(layout, create=False, file_id=ring.file_id)  # the real one maps
        worker_view.close()
        path.unlink()
        replacement, _ = shm.create(layout.segment, layout.nbytes)  # a namesake, same size
        replacement.close()
        with pytest.raises(shm.SegmentError, match="is not the segment the server created"):
            Ring(layout, create=False, file_id=ring.file_id)
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(shm.SegmentError, match=f"owned by uid {NOBODY}, expected our uid"):
            Ring(layout, create=False, file_id=ring.file_id)
        path.unlink()
        path.symlink_to("/dev/null")
        with pytest.raises(OSError):  # O_NOFOLLOW: ELOOP
            Ring(layout, create=False, file_id=ring.file_id)
    finally:
        ring.close()
        path.unlink(missing_ok=True)


def test_open_ref_refuses_a_replaced_data_segment():
    segment = shm.segment_name(os.getpid(), "swapdata", "data")
    ref = sources.publish({"features": np.zeros((8, 3), np.float32), "labels": np.arange(8)}, segment)
    path = shm.SHM_DIR / segment
    keep_inode = os.open(path, os.O_RDONLY)  # so the replacement cannot reuse the inode number
    try:
        assert sources.open_ref(ref)["features"].shape == (8, 3)
        path.unlink()
        _plant(segment)
        with pytest.raises(shm.SegmentError, match="is not the segment the server created"):
            sources.open_ref(ref)
    finally:
        os.close(keep_inode)
        shm.unlink(segment)


# 4. the server never imports from the caller's folder

PLANTED = "import os\nopen(os.path.join({folder!r}, f'imported-{{__name__}}-{{os.getpid()}}'), 'w').close()\n"


def test_the_server_and_its_workers_never_import_from_the_callers_folder(tmp_path, name):
    caller = tmp_path / "caller"
    caller.mkdir()
    for module in ("secrets", "numpy"):
        (caller / f"{module}.py").write_text(PLANTED.format(folder=str(caller)))
    _data(caller / "data")
    control = subprocess.run([sys.executable, "-c", "import secrets"], cwd=caller, timeout=COMMAND_TIMEOUT_S)
    assert control.returncode == 0 and list(caller.glob("imported-secrets-*")), "the planted module must work"
    for marker in caller.glob("imported-*"):
        marker.unlink()
    # -P on the outer command too: only the server it launches is under test
    start = subprocess.run([sys.executable, "-P", "-m", "ringfeed.server.cli", "start", "--data", "data",
                            "--batch-size", "4", "--workers", "2", "--name", name],
                           cwd=caller, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    try:
        assert start.returncode == 0, start.stderr
        with Feed(name=name, timeout_s=30) as feed:
            batches = [batch for _, batch in zip(range(4), feed.generator())]
        assert batches[0][0].shape == (4, 8, 8, 3)
    finally:
        stopped = subprocess.run([*RINGFEED, "stop", "--name", name], capture_output=True, text=True,
                                 timeout=COMMAND_TIMEOUT_S)
    assert stopped.returncode == 0, stopped.stderr
    assert not list(caller.glob("imported-*"))


# 5. one server per name, and each server removes only its own files

def test_a_second_server_of_the_same_name_is_refused_and_touches_nothing(tmp_path, name):
    data = _data(tmp_path / "data")
    serve = [*RINGFEED, "serve", "--data", data, "--batch-size", "4", "--workers", "1", "--name", name]
    first = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    try:
        state = _wait_for_state(name, first.pid)
        sock, state_path = _runtime() / f"{name}.sock", _runtime() / f"{name}.json"
        identities = {path: os.stat(path).st_ino for path in (sock, state_path)}
        second = subprocess.run(serve, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert second.returncode != 0
        assert (f"a ringfeed server named {name!r} is already running (pid {first.pid}, endpoint "
                f"{state['endpoint']})") in second.stderr
        assert {path: os.stat(path).st_ino for path in (sock, state_path)} == identities
        with Feed(name=name, timeout_s=30) as feed:
            assert next(feed.generator())[0].shape == (4, 8, 8, 3)
        # A state file rewritten by someone else is theirs now: the first server must leave it.
        state_path.unlink()
        state_path.write_text(json.dumps({"pid": 1, "endpoint": "ipc:///elsewhere", "name": name}))
        assert first.poll() is None
    finally:
        log = _stop(first)
    assert first.returncode == 0, log
    assert not sock.exists()
    assert json.loads(state_path.read_text())["pid"] == 1
    state_path.unlink()


# 6. names are validated by status and stop

@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_refuse_a_name_that_is_a_path(tmp_path, command):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = os.path.relpath(tmp_path / "x", _runtime())  # ../../<tmp_path>/x: its .json is ours
        (tmp_path / "x.json").write_text(json.dumps({"pid": sleeper.pid, "endpoint": "ipc:///nowhere"}))
        out = subprocess.run([*RINGFEED, command, "--name", name], capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT_S)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and "--name: name must be 1 to 64 letters" in out.stderr
        assert pid_alive(sleeper.pid) and (tmp_path / "x.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait(SERVER_STOP_TIMEOUT_S)


# 7. .npz members are size-checked from their headers

def _npy_header(shape: tuple, descr: str) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


def _npz(path: Path, features_header: bytes) -> Path:
    labels = io.BytesIO()
    np.save(labels, np.arange(4))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("features.npy", features_header + bytes(16))
        archive.writestr("labels.npy", labels.getvalue())
    return path


def test_an_npz_whose_header_claims_a_huge_shape_is_refused_before_loading(tmp_path):
    path = _npz(tmp_path / "huge.npz", _npy_header((10**12, 64), "|u1"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        sources.load_path(str(path), ("features", "labels"))
    assert time.monotonic() - started < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024 < 64 * MiB
    message = str(err.value)
    assert str(path) in message and "is too large to load" in message
    assert f"'features' of shape (1000000000000, 64) and dtype uint8 ({64 * 10**12} bytes)" in message
    assert "over the limit of" in message and "MemAvailable" in message


def test_an_npz_member_of_object_dtype_is_refused(tmp_path):
    path = _npz(tmp_path / "objects.npz", _npy_header((4,), "|O"))
    with pytest.raises(ConfigError, match="member 'features' has dtype object, which holds Python objects"):
        sources.load_path(str(path), ("features", "labels"))


# 8. who can read the batches; CURVE keys revoked without a restart

@pytest.mark.parametrize("endpoint, readers", [
    ("tcp://127.0.0.1:5555", "any user or process on this host"),
    ("tcp://localhost:5555", "any user or process on this host"),
    ("tcp://[::1]:5555", "any user or process on this host"),
    ("tcp://0.0.0.0:5555", "anyone who can reach this port"),
    ("tcp://*:5555", "anyone who can reach this port"),
    ("tcp://eth0:5555", "anyone who can reach this port"),
])
def test_the_cleartext_warning_says_who_can_read_the_batches(endpoint, readers):
    assert cleartext_readers(endpoint) == readers


def test_a_removed_curve_key_is_refused_without_a_restart(tmp_path, name):
    keys = generate_keys(str(tmp_path / "keys"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [*RINGFEED, "serve", "--data", _data(tmp_path / "data"), "--batch-size", "4", "--workers", "1",
         "--name", name, "--endpoint", endpoint, "--curve-secret-key", keys["server_secret"],
         "--curve-authorized-keys", keys["authorized"]], stderr=subprocess.PIPE, text=True)
    client_key = Path(keys["authorized"]) / "client.key"
    with_key = {"curve_server_key": keys["server_public"], "curve_secret_key": keys["client_secret"]}
    try:
        with Feed(endpoint, timeout_s=60, **with_key) as feed:
            assert next(feed.generator())[0].shape == (4, 8, 8, 3)
        kept = client_key.read_bytes()
        client_key.unlink()
        time.sleep(1.5)
        with pytest.raises(RingfeedError, match="refused this client's CURVE handshake"):
            Feed(endpoint, timeout_s=5, **with_key)
        client_key.write_bytes(kept)
        time.sleep(1.5)
        with Feed(endpoint, timeout_s=30, **with_key) as feed:
            assert next(feed.generator())[0].shape == (4, 8, 8, 3)
    finally:
        log = _stop(server)
    assert "added or replaced [], removed ['client.key']" in log
    assert "added or replaced ['client.key'], removed []" in log
