"""The client trusts no server, runtime folder or state file further than it can check them.

A fake server (a real ROUTER socket) answers the Feed's HELLO with a WELCOME
that differs from a real server's in exactly one field; the files the hostile
WELCOME names must come out byte-for-byte unchanged, and ``Feed(...)`` must
raise an error naming that field. Runtime folders and state files are real
folders and files, planted as an attacker would plant them.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq

from ringfeed import Feed, protocol
from ringfeed.errors import RingfeedError, ServerGoneError
from ringfeed.layout import mailbox_bytes
from ringfeed.paths import SHM_DIR, ensure_runtime_dir, pid_namespace, pid_namespace_id, read_state_file
from ringfeed.structure import Structure
from conftest import free_port
from ringfeed.server import Config, Service, background

NOBODY = 65534
PREFETCH = 16


# -- a real WELCOME to start from ------------------------------------------------

@pytest.fixture(scope="module")
def real_welcome() -> dict:
    """The WELCOME a real service sends, as the JSON object on the wire."""
    name = "t" + uuid.uuid4().hex[:10]
    with Service(Config(batch_size=4, workers=1, name=name),
                 features=np.zeros((16, 3), np.float32), labels=np.arange(16)) as service:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(service.endpoint)
            sock.send_multipart(protocol.hello(0, 0, PREFETCH, os.getpid(), pid_namespace()))
            assert sock.poll(10_000), "the real service sent no WELCOME"
            frames = sock.recv_multipart()
            sock.send_multipart([protocol.BYE])
        finally:
            sock.close(0)
    assert frames[0] == protocol.WELCOME
    return json.loads(frames[1])


def _segment_name() -> str:
    return f"ringfeed-{pid_namespace_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-ring"


def _ring_bytes(layout: dict) -> bytes:
    """What a fresh ring segment of ``layout`` holds: its token, then zeros."""
    nbytes = layout["header"] + layout["slots"] * layout["slot_bytes"]
    token = bytes.fromhex(layout["token"])
    return token + bytes(nbytes - len(token))


@pytest.fixture
def decoy(real_welcome):
    """A file in /dev/shm that a WELCOME may name as its ring: ours, 0600, the real token."""
    path = SHM_DIR / _segment_name()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_ring_bytes(real_welcome["layout"]))
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def base_welcome(real_welcome, decoy) -> dict:
    """The real WELCOME naming ``decoy`` as its ring (the real ring is gone with its server)."""
    welcome = copy.deepcopy(real_welcome)
    welcome["layout"]["segment"] = decoy.name
    return welcome


@pytest.fixture
def victim(tmp_path, real_welcome) -> Path:
    """A file of the trainer's own, outside /dev/shm, that would pass as the ring."""
    path = tmp_path / "victim.bin"
    path.write_bytes(_ring_bytes(real_welcome["layout"]))
    path.chmod(0o600)
    return path


# -- a fake server ---------------------------------------------------------------

class FakeServer:
    """A ROUTER that answers HELLO with ``welcome`` (sent as given, unchecked), MODE with the
    messages ``after_mode`` if given, and records what the client says."""

    def __init__(self, welcome: dict, *after_mode: list[bytes]):
        self.after_mode = after_mode
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.body = json.dumps(welcome).encode()
        self.commands: list[bytes] = []
        self.modes: list[bytes] = []
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._thread = threading.Thread(target=self._serve, daemon=True)  # the socket moves there

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(20):
                    continue
                identity, command, *rest = self._sock.recv_multipart()
                self.commands.append(command)
                if command == protocol.HELLO:
                    self._sock.send_multipart([identity, protocol.WELCOME, self.body])
                elif command == protocol.MODE:
                    self.modes.append(rest[0])
                    for message in self.after_mode:
                        self._sock.send_multipart([identity, *message])
        finally:
            self._sock.close(0)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# -- hostile WELCOMEs --------------------------------------------------------------
# Each takes (welcome, decoy, victim, request), changes exactly one field of ``welcome`` and returns
# the file that must stay unchanged and the field the error must name.

def _dotdot(welcome, decoy, victim, request):
    welcome["layout"]["segment"] = "../.." + str(victim)  # /dev/shm/../../tmp/... is the victim
    return victim, "segment"


@pytest.fixture
def planted_link(victim):
    link = SHM_DIR / _segment_name()
    link.symlink_to(victim)
    yield link
    link.unlink(missing_ok=True)


def _symlink(welcome, decoy, victim, request):
    welcome["layout"]["segment"] = request.getfixturevalue("planted_link").name
    return victim, "segment"


def _other_uid(welcome, decoy, victim, request):
    os.chown(decoy, NOBODY, NOBODY)
    return decoy, "segment"


def _group_writable(welcome, decoy, victim, request):
    decoy.chmod(0o620)
    return decoy, "segment"


def _field(key, value, *, layout=True):
    """A case that sets WELCOME's (or its layout's) ``key`` to ``value``."""
    def case(welcome, decoy, victim, request):
        (welcome["layout"] if layout else welcome)[key] = value(welcome["layout"]) if callable(value) else value
        return decoy, key
    return case


def _slot_field(position, key, value, names):
    """A case that sets ``key`` of the layout's field ``position`` to ``value``; the error names ``names``."""
    def case(welcome, decoy, victim, request):
        layout = welcome["layout"]
        layout["fields"][position][key] = value(layout) if callable(value) else value
        return decoy, names
    return case


def _unknown_input(welcome, decoy, victim, request):
    welcome["structure"]["inputs"] = "image"
    return decoy, "'image'"


HOSTILE = {
    "segment outside /dev/shm via ../": _dotdot,
    "segment a symlink to a victim": _symlink,
    "segment owned by another uid": _other_uid,
    "segment writable by group": _group_writable,
    "empty token": _field("token", ""),
    "short token": _field("token", "ab" * 8),
    "uppercase token": _field("token", lambda layout: layout["token"].upper()),
    "token mismatch": _field("token", lambda layout: "%032x" % (int(layout["token"], 16) ^ 1)),
    "mailbox offset outside the header": _field("mailbox_offset", lambda layout: layout["header"]),
    "credit above what was asked": _field("credit", PREFETCH + 1, layout=False),
    "object dtype": _slot_field(0, "dtype", "|O", "fields[0]"),
    "string dtype": _slot_field(1, "dtype", "<U4", "fields[1]"),
    "field region outside the slot": _slot_field(0, "offset", lambda layout: layout["slot_bytes"], "slot_bytes"),
    "fields overlapping": _slot_field(1, "offset", lambda layout: layout["fields"][0]["offset"], "overlap"),
    "structure naming a field not in the layout": _unknown_input,
}
MAPPING_CASES = ["segment a symlink to a victim", "segment owned by another uid", "segment writable by group",
                 "token mismatch"]  # found out only by opening the file


def _make_hostile(case: str, base_welcome, decoy, victim, request):
    welcome = copy.deepcopy(base_welcome)
    target, field = HOSTILE[case](welcome, decoy, victim, request)
    return welcome, target, field


def _assign_mailbox(welcome: dict, segment: Path) -> None:
    """Stamp the token of the mailbox ``welcome`` offers, as the broker's Mailbox.assign does."""
    k, token = welcome["mailbox"]
    layout = welcome["layout"]
    with open(segment, "r+b") as f:
        f.seek(layout["mailbox_offset"] + k * mailbox_bytes(layout["mailbox_capacity"]))
        f.write(token.to_bytes(8, "little"))


def test_the_real_welcome_and_the_base_one_pass(real_welcome, base_welcome):
    for welcome in (real_welcome, base_welcome):
        parsed = protocol.parse_welcome([protocol.WELCOME, json.dumps(welcome).encode()], PREFETCH)
        assert parsed.layout.segment == welcome["layout"]["segment"]
        assert parsed.layout.names == ("features", "labels") and parsed.structure == Structure()
        assert parsed.layout.token == bytes.fromhex(welcome["layout"]["token"])
        assert parsed.credit == welcome["credit"] and parsed.mailbox == tuple(welcome["mailbox"])
    differing = {k for k in real_welcome["layout"] if real_welcome["layout"][k] != base_welcome["layout"][k]}
    assert differing == {"segment"}


def test_a_feed_takes_the_base_welcome_and_writes_its_mailbox(base_welcome, decoy):
    """The control: a WELCOME the feed accepts is a licence to write into the file it names,
    so the cases below would show any write."""
    _assign_mailbox(base_welcome, decoy)
    before = decoy.read_bytes()
    with FakeServer(base_welcome) as server:
        feed = Feed(server.endpoint, timeout_s=1.0, prefetch=PREFETCH, transport="shm")
        try:
            with pytest.raises(ServerGoneError):
                feed.next_batch()  # sleeps on its mailbox: writes the "waiting" word
        finally:
            feed.close()
    assert server.modes == [b"mailbox"]
    assert decoy.read_bytes() != before


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_welcome_is_refused_and_writes_nothing(case, base_welcome, decoy, victim, request):
    welcome, target, field = _make_hostile(case, base_welcome, decoy, victim, request)
    before = target.read_bytes()
    with FakeServer(welcome) as server:
        with pytest.raises(RingfeedError) as caught:
            Feed(server.endpoint, timeout_s=5.0, prefetch=PREFETCH, transport="shm")
    assert field in str(caught.value)
    assert server.commands == [protocol.HELLO]  # refused before MODE: nothing was streamed
    assert target.read_bytes() == before


def test_a_batch_descriptor_outside_the_ring_is_refused(base_welcome, decoy):
    slots = base_welcome["layout"]["slots"]
    outside = protocol.batches([protocol.BatchMsg(slots, 0, 0, 0, 0)])
    _assign_mailbox(base_welcome, decoy)
    with FakeServer(base_welcome, outside) as server:
        feed = Feed(server.endpoint, timeout_s=5.0, prefetch=PREFETCH, transport="shm")
        try:
            with pytest.raises(RingfeedError, match=f"slot {slots}, expected 0 to {slots - 1}"):
                feed.next_batch()
        finally:
            feed.close()


def test_a_batch_frame_of_the_wrong_size_is_refused_naming_its_field(base_welcome):
    fields = base_welcome["layout"]["fields"]
    sizes = [int(np.prod(f["shape"])) * np.dtype(f["dtype"]).itemsize for f in fields]
    short = [*protocol.batch(protocol.BatchMsg(0, 0, 0, 0, 0)), *(bytes(n) for n in sizes[:-1]), bytes(sizes[-1] - 1)]
    with FakeServer(base_welcome, short) as server:
        feed = Feed(server.endpoint, timeout_s=5.0, prefetch=PREFETCH, transport="frames")
        try:
            with pytest.raises(protocol.ProtocolError, match=f"field '{fields[-1]['name']}' is {sizes[-1] - 1} "
                                                             f"bytes, expected {sizes[-1]}"):
                feed.next_batch()
        finally:
            feed.close()


def test_the_batches_before_a_malformed_message_are_kept(base_welcome):
    """The ProtocolError of a bad message costs that message only: the batch that came before
    it in the same take is still handed out."""
    fields = base_welcome["layout"]["fields"]
    sizes = [int(np.prod(f["shape"])) * np.dtype(f["dtype"]).itemsize for f in fields]
    good = [*protocol.batch(protocol.BatchMsg(0, 0, 0, 0, 0)), *(bytes([7]) * n for n in sizes)]
    short = [*protocol.batch(protocol.BatchMsg(0, 0, 0, 1, 1)), *(bytes(n) for n in sizes[:-1])]  # a frame short
    with FakeServer(base_welcome, good, short) as server:
        feed = Feed(server.endpoint, timeout_s=5.0, prefetch=PREFETCH, transport="frames")
        try:
            time.sleep(0.5)  # both are on the socket before the first call: one take reads them
            outcomes = []
            for _ in range(2):
                try:
                    x, _ = feed.next_batch(copy=True)
                    outcomes.append(("batch", feed.last_batch, bool((x.view(np.uint8) == 7).all())))
                except protocol.ProtocolError as exc:
                    outcomes.append(("error", f"BATCH: expected {2 + len(fields)} frame(s)" in str(exc)))
            assert sorted(outcomes) == [("batch", (0, 0), True), ("error", True)], outcomes
        finally:
            feed.close()


@pytest.mark.parametrize("case", MAPPING_CASES)
def test_auto_transport_declines_an_untrusted_segment_for_frames(case, base_welcome, decoy, victim, request):
    """transport="auto" maps only a segment it trusts; else the batches come as frames."""
    welcome, target, _ = _make_hostile(case, base_welcome, decoy, victim, request)
    before = target.read_bytes()
    with FakeServer(welcome) as server:
        feed = Feed(server.endpoint, timeout_s=5.0, prefetch=PREFETCH)
        feed.close()
    assert server.modes == [b"frames"]
    assert target.read_bytes() == before


# -- parse_welcome field by field ------------------------------------------------------

def _set(path: str, value, names: str | None = None):
    """A case that sets (``value`` None: deletes) WELCOME's ``path``, keys and list positions joined
    by dots; the error names ``names``, by default the last key."""
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]

    def case(welcome):
        obj = welcome
        for key in parents:
            obj = obj[key]
        if value is None:
            del obj[last]
        else:
            obj[last] = value(welcome) if callable(value) else value
        return names or last
    return case


def _unused_field(welcome):
    layout = welcome["layout"]
    layout["fields"].append({"name": "extra", "offset": layout["slot_bytes"] - 64, "shape": [4], "dtype": "|u1"})
    return "'extra'"


PARSE_CASES = {
    "missing key": _set("steps_per_epoch", None),
    "bool as int": _set("batch_size", True),
    "float as int": _set("samples", 16.0),
    "zero heartbeat": _set("heartbeat_s", 0),
    "hour-long heartbeat": _set("heartbeat_s", 3601),
    "credit zero": _set("credit", 0),
    "ordered not a bool": _set("ordered", 1),
    "mailbox index past the mailboxes": _set("mailbox", lambda w: [w["layout"]["mailboxes"], 1]),
    "mailbox token zero": _set("mailbox", [0, 0]),
    "mailbox token too big": _set("mailbox", [0, 1 << 63]),
    "layout not an object": _set("layout", []),
    "segment a data segment": _set("layout.segment", lambda w: w["layout"]["segment"][:-4] + "data"),
    "segment with a trailing newline": _set("layout.segment", lambda w: w["layout"]["segment"] + "\n"),
    "token with a trailing newline": _set("layout.token", lambda w: w["layout"]["token"][:-1] + "\n"),
    "no slots": _set("layout.slots", 0),
    "too many slots": _set("layout.slots", 65537),
    "capacity not slots": _set("layout.mailbox_capacity", lambda w: w["layout"]["slots"] + 1),
    "unaligned header": _set("layout.header", lambda w: w["layout"]["header"] + 8),
    "mailbox offset inside the token": _set("layout.mailbox_offset", 0),
    "no fields": _set("layout.fields", [], "'fields'"),
    "fields not a list": _set("layout.fields", {}, "'fields'"),
    "a field not an object": _set("layout.fields.0", "features", "fields[0]"),
    "a field with an unknown key": _set("layout.fields.0.stride", 8, "fields[0]"),
    "unaligned field offset": _set("layout.fields.0.offset", 8, "fields[0] ('features'): field 'offset'"),
    "fields overlapping": _set("layout.fields.1.offset", 0, "'labels' [0, 32) and 'features' [0, 48) overlap"),
    "field region outside the slot": _set("layout.fields.1.offset", lambda w: w["layout"]["slot_bytes"],
                                          "field 'labels'"),
    "field shape not starting with the batch": _set("layout.fields.1.shape", [5], "fields[1] ('labels'): "
                                                    "field 'shape' must start with batch_size 4"),
    "field shape with 9 dimensions": _set("layout.fields.0.shape", [4] + [1] * 8, "fields[0] ('features')"),
    "negative dimension": _set("layout.fields.0.shape", [4, -3], "fields[0] ('features')"),
    "dtype record": _set("layout.fields.0.dtype", "|V12", "fields[0] ('features'): field 'dtype'"),
    "dtype long double": _set("layout.fields.0.dtype", "<f16", "fields[0] ('features'): field 'dtype'"),
    "dtype object": _set("layout.fields.1.dtype", "|O", "fields[1] ('labels'): field 'dtype'"),
    "dtype string": _set("layout.fields.1.dtype", "<U4", "fields[1] ('labels'): field 'dtype'"),
    "duplicate field name": _set("layout.fields.1.name", "features", "fields[1]: field 'name' 'features'"),
    "field name not an identifier": _set("layout.fields.0.name", "../x", "fields[0]: field 'name'"),
    "field name a number": _set("layout.fields.0.name", 7, "fields[0]: field 'name'"),
    "missing structure": _set("structure", None),
    "structure not an object": _set("structure", "features", "'structure'"),
    "structure with an unknown role": _set("structure.weights", "labels", "WELCOME structure"),
    "structure naming a field not in the layout": _set("structure.targets", ["labels", "boxes"], "'boxes'"),
    "structure using a field twice": _set("structure.sample_weight", "labels", "'labels'"),
    "layout field the structure does not use": _unused_field,
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_parse_welcome_names_the_field_it_refuses(case, real_welcome):
    welcome = copy.deepcopy(real_welcome)
    names = PARSE_CASES[case](welcome)
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse_welcome([protocol.WELCOME, json.dumps(welcome).encode()], PREFETCH)
    assert names in str(caught.value)


@pytest.mark.parametrize("body", [b'{"batch_size": ' + b"1" * 5000 + b"}", b"[" * 30000 + b"]" * 30000,
                                  b"\xff", b"[]"], ids=["huge int", "deep nesting", "not UTF-8", "not an object"])
def test_parse_welcome_refuses_what_json_cannot_read_as_a_protocol_error(body):
    with pytest.raises(protocol.ProtocolError, match="WELCOME"):
        protocol.parse_welcome([protocol.WELCOME, body], PREFETCH)


def test_parse_welcome_ignores_unknown_keys_and_accepts_a_welcome_without_a_mailbox(real_welcome):
    welcome = copy.deepcopy(real_welcome)
    del welcome["mailbox"]
    welcome["future"] = {"anything": 1}
    welcome["layout"]["future"] = [1, 2]
    parsed = protocol.parse_welcome([protocol.WELCOME, json.dumps(welcome).encode()], PREFETCH)
    assert parsed.mailbox is None


# -- runtime folders -----------------------------------------------------------------

def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def _link_to_private(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(_private_dir(tmp_path / "real"))
    return link, "symbolic link"


def _owned_by_nobody(tmp_path):
    path = _private_dir(tmp_path / "nobodys")
    os.chown(path, NOBODY, NOBODY)
    return path, f"uid {NOBODY}"


def _world_writable(tmp_path):
    path = _private_dir(tmp_path / "open")
    path.chmod(0o1777)
    return path, "writable by group or others"


def _a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    path.chmod(0o600)
    return path, "not a folder"


UNTRUSTED_DIRS = {"symlink": _link_to_private, "another uid": _owned_by_nobody,
                  "world-writable": _world_writable, "a file": _a_file}


def _fingerprint(path: Path) -> tuple:
    st, target = os.lstat(path), os.stat(path)
    return st.st_mode, st.st_uid, target.st_mode, target.st_uid


@pytest.mark.parametrize("case", list(UNTRUSTED_DIRS))
def test_ensure_runtime_dir_refuses_an_untrusted_folder_and_never_chmods_it(case, tmp_path, monkeypatch):
    path, problem = UNTRUSTED_DIRS[case](tmp_path)
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(path))
    before = _fingerprint(path)
    with pytest.raises(PermissionError) as caught:
        ensure_runtime_dir()
    message = str(caught.value)
    assert str(path) in message and problem in message and "RINGFEED_RUNTIME_DIR" in message
    assert _fingerprint(path) == before


def test_ensure_runtime_dir_makes_a_missing_folder_owner_only(tmp_path, monkeypatch):
    path = tmp_path / "parent" / "runtime"
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(path))
    assert ensure_runtime_dir() == path
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert ensure_runtime_dir() == path  # and accepts it the next time


@pytest.mark.parametrize("case", list(UNTRUSTED_DIRS))
def test_a_feed_refuses_the_default_endpoint_in_an_untrusted_folder(case, tmp_path, monkeypatch, name):
    path, problem = UNTRUSTED_DIRS[case](tmp_path)
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(path))
    with pytest.raises(PermissionError, match=problem):
        Feed(name=name, timeout_s=2.0)


def test_a_feed_without_a_runtime_folder_says_so_at_once(tmp_path, monkeypatch, name):
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(tmp_path / "missing"))
    with pytest.raises(ServerGoneError, match="does not exist"):
        Feed(name=name, timeout_s=30.0)
    assert not (tmp_path / "missing").exists()


# -- state files ---------------------------------------------------------------------
# Untrusted state files are errors, not None: read_state_file raises PermissionError and
# background.read_state a BackgroundError, so `ringfeed stop` never signals a pid they name.

@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    path = _private_dir(tmp_path / "runtime")
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def bystander():
    """A live process that an untrusted state file names."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _write_state(path: Path, pid: int, mode: int = 0o600) -> Path:
    path.write_text(json.dumps({"pid": pid, "endpoint": "ipc:///nowhere", "name": path.stem}))
    path.chmod(mode)
    return path


def _state_link(runtime, name, pid):
    target = _write_state(runtime.parent / "elsewhere.json", pid)
    (runtime / f"{name}.json").symlink_to(target)
    return "symbolic link"


def _state_of_nobody(runtime, name, pid):
    os.chown(_write_state(runtime / f"{name}.json", pid), NOBODY, NOBODY)
    return f"uid {NOBODY}"


def _state_group_writable(runtime, name, pid):
    _write_state(runtime / f"{name}.json", pid, 0o620)
    return "writable by group or others"


def _state_in_open_folder(runtime, name, pid):
    _write_state(runtime / f"{name}.json", pid)
    runtime.chmod(0o777)
    return "writable by group or others"


UNTRUSTED_STATE = {"symlink": _state_link, "another uid": _state_of_nobody,
                   "group-writable": _state_group_writable, "in a world-writable folder": _state_in_open_folder}


@pytest.mark.parametrize("case", list(UNTRUSTED_STATE))
def test_an_untrusted_state_file_is_refused_and_its_pid_never_signalled(case, runtime, name, bystander):
    problem = UNTRUSTED_STATE[case](runtime, name, bystander.pid)
    path = runtime / f"{name}.json"
    with pytest.raises(PermissionError, match=problem):
        read_state_file(path)
    with pytest.raises(background.BackgroundError, match=problem):
        background.read_state(name)
    with pytest.raises(background.BackgroundError, match=problem):
        background.stop(name)
    assert bystander.poll() is None  # alive: nothing was signalled
    assert os.path.lexists(path)  # and nothing removed


def test_state_files_that_are_missing_stale_or_malformed_read_as_none(runtime, name, bystander):
    path = runtime / f"{name}.json"
    assert read_state_file(path) is None and background.read_state(name) is None
    _write_state(path, bystander.pid)
    assert read_state_file(path)["pid"] == bystander.pid
    assert background.read_state(name)["pid"] == bystander.pid
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        read_state_file(path)
    assert background.read_state(name) is None
    path.write_text(" " * (64 * 1024 + 1))
    with pytest.raises(ValueError, match="more than"):
        read_state_file(path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_state(path, dead.pid)
    assert background.read_state(name) is None and not path.exists()  # a stale file is removed


def test_a_bad_frame_the_heartbeat_takes_is_the_feeds_failure_and_the_heartbeat_goes_on(base_welcome):
    """A frame that arrives while the trainer is busy elsewhere is read by the heartbeat thread.
    Its error must reach the trainer, and the thread must go on reading the socket's monitor:
    libzmq's I/O thread, shared by every socket of the process, waits while a monitor is full."""
    fields = base_welcome["layout"]["fields"]
    bad = [*protocol.batch(protocol.BatchMsg(0, 0, 0, 0, 0)), *(b"" for _ in fields)]
    with FakeServer(base_welcome, bad) as server:
        feed = Feed(server.endpoint, timeout_s=5.0, prefetch=PREFETCH, transport="frames")
        try:
            deadline = time.monotonic() + 10 * feed.heartbeat_s
            while feed._conn.failure is None and time.monotonic() < deadline:
                time.sleep(feed.heartbeat_s / 8)  # not reading: the heartbeat takes the frame
            with pytest.raises(protocol.ProtocolError, match=f"field '{fields[0]['name']}' is 0 bytes"):
                feed.next_batch()
            assert feed._conn.thread.is_alive()
        finally:
            feed.close()
        feed._conn.thread.join(5)
        assert not feed._conn.thread.is_alive()
