"""Connection floods against a real server: the frontend holds at most ``max_connections``."""

import importlib.util
import os
import select
import selectors
import signal
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import expected_batches, free_port, rgb_images, take

from ringfeed import Feed, protocol
from ringfeed.paths import pid_namespace
from ringfeed.status import query_status
from ringfeed.server import Config, ConfigError, Service
from ringfeed.server.config import MIN_INBOUND_BYTES_PER_S
from ringfeed.server.connections import ConnectionGuard, default_max_connections, end_connection

CAP = 50
FLOOD = 200
SETTLE_S = 5.0  # how long the server may take to end or drop connections
POLL_S = 0.05


def _service(name: str, images: np.ndarray, **options) -> Service:
    config = Config(batch_size=8, workers=1, name=name, endpoint=f"tcp://127.0.0.1:{free_port()}",
                    max_connections=CAP, **options)
    return Service(config, features=images, labels=np.arange(len(images)))


def _port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def _socket_fds(pid: int) -> int:
    """How many sockets process ``pid`` holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # closed while we looked
            continue
    return count


def _settled_socket_fds(pid: int, at_most: int) -> int:
    """The server's socket count, once it has fallen to ``at_most`` or after ``SETTLE_S``."""
    deadline = time.monotonic() + SETTLE_S
    while (held := _socket_fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return held


def _flood(stack: ExitStack, port: int, n: int) -> list[socket.socket]:
    """``n`` raw TCP connections: each holds an fd on the server without saying anything."""
    return [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=SETTLE_S))
            for _ in range(n)]


def _ended_by_server(conns: list[socket.socket]) -> int:
    """How many of ``conns`` the server ends (EOF or reset) within ``SETTLE_S``; the server's
    ZMTP greeting is read and ignored."""
    ended = 0
    with selectors.DefaultSelector() as sel:
        for conn in conns:
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
        deadline = time.monotonic() + SETTLE_S
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(min(left, 0.5)):
                try:
                    data = key.fileobj.recv(4096)
                except (ConnectionResetError, BlockingIOError) as exc:
                    data = b"" if isinstance(exc, ConnectionResetError) else None
                if data == b"":
                    sel.unregister(key.fileobj)
                    ended += 1
    return ended


def test_flood_of_idle_connections_is_capped_and_the_rest_are_closed(name):
    images = rgb_images(256, 16)
    with _service(name, images) as svc, ExitStack() as flood:
        baseline = _socket_fds(svc.pid)
        conns = _flood(flood, _port(svc.endpoint), FLOOD)
        assert _ended_by_server(conns) == FLOOD - CAP
        assert baseline < _settled_socket_fds(svc.pid, baseline + CAP) <= baseline + CAP


def test_a_feed_is_served_once_the_flood_is_gone(name):
    images = rgb_images(256, 16)
    with _service(name, images) as svc:
        expected = expected_batches(svc.config, images, np.arange(256), 6)
        baseline = _socket_fds(svc.pid)
        with ExitStack() as flood:
            _ended_by_server(_flood(flood, _port(svc.endpoint), FLOOD))
        assert _settled_socket_fds(svc.pid, baseline) == baseline
        with Feed(svc.endpoint) as feed:
            got = take(feed, 6)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_feed_connected_before_a_flood_is_served_through_it_and_a_worker_restart(name):
    images = rgb_images(256, 16)
    with _service(name, images) as svc, Feed(svc.endpoint, timeout_s=30) as feed:
        expected = expected_batches(svc.config, images, np.arange(256), 40)
        (worker,) = query_status(svc.endpoint)["worker_pids"]
        got = take(feed, 10)
        with ExitStack() as flood:
            conns = _flood(flood, _port(svc.endpoint), FLOOD)
            assert _ended_by_server(conns) == FLOOD - CAP + 1  # the feed holds one connection
            os.kill(worker, signal.SIGKILL)  # the restart opens pipes: fds must be left for it
            got += take(feed, 20)
        got += take(feed, 10)
        status = query_status(svc.endpoint)
    assert status["worker_restarts"] == 1 and status["workers"] == 1
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert x.tobytes() == ex.tobytes() and np.array_equal(y, ey)


def test_end_connection_leaves_alone_what_is_not_a_connection_on_the_endpoint():
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_server(("127.0.0.1", 0)) as other:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with socket.create_connection(other.getsockname()) as _, other.accept()[0] as elsewhere:
            assert not end_connection(elsewhere.fileno(), endpoint)  # another port
        assert not end_connection(listener.fileno(), endpoint)  # the listener has no peer
        read, write = os.pipe()
        os.close(write)
        assert not end_connection(read, endpoint)  # not a socket
        os.close(read)
        assert not end_connection(read, endpoint)  # closed
        with socket.create_connection(listener.getsockname()) as peer, listener.accept()[0] as accepted:
            assert end_connection(accepted.fileno(), endpoint)
            peer.settimeout(SETTLE_S)
            assert peer.recv(1) == b""
            assert accepted.fileno() >= 0  # the owner's fd stays open; only the connection ended


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "10"])
def test_max_connections_is_validated(value):
    with pytest.raises(ConfigError, match="max_connections"):
        Config(max_connections=value)


def test_default_cap_is_well_below_the_fd_limit():
    assert default_max_connections(20000) == 4096
    assert default_max_connections(10**6) == 4096
    assert default_max_connections(1024) == 256
    assert default_max_connections(2) == 1


FLOOD_CLIENTS = 2000


def _batches_per_s(feed, seconds: float) -> float:
    stream, count, end = feed.generator(), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        next(stream)
        count += 1
    return count / seconds


def _zmq_flood(endpoint: str, stop, ready) -> None:
    """2,000 DEALERs that say HELLO and then PING every second, each on its own connection."""
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = FLOOD_CLIENTS + 100
    socks = []
    try:
        for _ in range(FLOOD_CLIENTS):
            sock = ctx.socket(zmq.DEALER)
            sock.linger, sock.sndhwm, sock.rcvhwm = 0, 10, 10
            sock.connect(endpoint)
            sock.send_multipart(protocol.hello(0, 0, 1, os.getpid(), pid_namespace()), zmq.NOBLOCK)
            socks.append(sock)
        ready.set()
        while not stop.wait(1.0):
            for sock in socks:
                try:
                    sock.send_multipart([protocol.PING], zmq.NOBLOCK)
                except zmq.Again:
                    pass
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()


def test_a_feed_keeps_half_its_rate_under_a_flood_of_2000_clients(name):
    """Ratio of one feed's batches/s with and without the flood, in one run (the flood is
    refused at max_clients; its pings are answered with Expired)."""
    with Service(Config(batch_size=8, workers=1, name=name), features=rgb_images(256, 16),
                 labels=np.arange(256)) as svc, Feed(svc.endpoint, timeout_s=30) as feed:
        _batches_per_s(feed, 1.0)
        alone = _batches_per_s(feed, 3.0)
        stop, ready = threading.Event(), threading.Event()
        flooder = threading.Thread(target=_zmq_flood, args=(svc.endpoint, stop, ready), daemon=True)
        flooder.start()
        try:
            assert ready.wait(120)
            time.sleep(2.0)  # every HELLO answered
            flooded = _batches_per_s(feed, 3.0)
            assert query_status(svc.endpoint)["clients"] <= svc.config.max_clients + 1
        finally:
            stop.set()
            flooder.join(60)
    assert flooded >= 0.5 * alone, f"{flooded:.0f} batches/s under the flood against {alone:.0f} alone"


def _load_probe():
    """benchmarks/pending_message_probe.py, whose raw ZMTP peer these tests reuse."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pending_message_probe.py"
    spec = importlib.util.spec_from_file_location("pending_message_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROBE = _load_probe()
ENDLESS_FRAME_BYTES = 64 * 1024  # under the frontend's frame limit: only the byte budget stops it
ENDLESS_BYTES = 512 << 20
# What a peer makes the server hold before the cut is its rate times the time to the next check
# (~0.1 s). At full speed that rate is the machine's (here 200-600 MiB/s); paced at 128x the
# default budget, the bound below holds on any machine.
ENDLESS_PACE_BYTES_PER_S = 128 << 20
CUT_TIMEOUT_S = 5.0  # how long the server may take to end a peer over its budget
MAX_RSS_GROWTH_MIB = 64
QUIET_FEED_S = 4.0


def _vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _ended(peer: socket.socket) -> bool:
    """Whether the readable ``peer`` was ended: past the handshake, the server sends it nothing else."""
    try:
        return peer.recv(4096) == b""
    except ConnectionResetError:
        return True


def _stream_endless_message(port: int, pace_bytes_per_s: float | None = None,
                            on_send=None) -> tuple[int, float | None]:
    """Stream frames that all carry MORE, after the ZMTP handshake, at ``pace_bytes_per_s`` (None:
    full speed), until the server ends the connection, ``ENDLESS_BYTES`` are sent or
    ``CUT_TIMEOUT_S`` passes. Returns (bytes sent, seconds until the server ended it, or None).
    ``on_send`` runs after each send (to drive a guard).

    The end is seen as EOF as well as a failed send: a server that closes with nothing left
    unread sends no reset, and its zero window can hold a blocking send for a minute."""
    frame = PROBE.more_frame(ENDLESS_FRAME_BYTES)
    chunk = memoryview(frame * ((1 << 20) // len(frame)))
    started, sent = time.monotonic(), 0
    with PROBE.zmtp_peer(port) as peer:
        peer.setblocking(False)
        while sent < ENDLESS_BYTES and (left := started + CUT_TIMEOUT_S - time.monotonic()) > 0:
            due = 0.0 if pace_bytes_per_s is None else started + sent / pace_bytes_per_s - time.monotonic()
            readable, writable, _ = select.select([peer], [] if due > 0 else [peer], [], min(left, POLL_S))
            if readable and _ended(peer):
                return sent, time.monotonic() - started
            if writable:
                try:
                    sent += peer.send(chunk[sent % len(chunk):])
                except (BrokenPipeError, ConnectionResetError):
                    return sent, time.monotonic() - started
                if on_send is not None:
                    on_send()
    return sent, None


def test_guard_ends_a_tcp_connection_over_its_inbound_budget():
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.ROUTER) as frontend:
        frontend.linger = 0
        port = frontend.bind_to_random_port("tcp://127.0.0.1")
        guard = ConnectionGuard(frontend, CAP, Config().max_inbound_bytes_per_s)

        def drive():
            guard.handle()
            guard.check_inbound()

        try:
            sent, cut_after = _stream_endless_message(port, on_send=drive)
            assert cut_after is not None, f"sent {sent} bytes and was not ended"
            assert guard.overdrawn == 1
            deadline = time.monotonic() + SETTLE_S
            while guard.open and time.monotonic() < deadline:  # until its end event comes
                guard.monitor.poll(POLL_S * 1000)
                guard.handle()
            assert guard.open == 0
        finally:
            guard.close()


def test_an_endless_message_over_tcp_is_cut_and_the_server_stays_bounded(name):
    images = rgb_images(256, 16)
    with _service(name, images) as svc:
        before = _vm_kib(svc.pid, "VmRSS")
        sent, cut_after = _stream_endless_message(_port(svc.endpoint), ENDLESS_PACE_BYTES_PER_S)
        assert cut_after is not None, f"sent {sent} bytes in {CUT_TIMEOUT_S} s and was not ended"
        peak = (_vm_kib(svc.pid, "VmHWM") - before) / 1024
        assert peak < MAX_RSS_GROWTH_MIB, f"peak RSS grew {peak:.0f} MiB while {sent >> 20} MiB were sent"
        with Feed(svc.endpoint) as feed:
            assert len(take(feed, 6)) == 6


def test_a_feed_over_tcp_is_never_cut_even_at_the_lowest_budget(name):
    images = rgb_images(256, 16)
    with _service(name, images, max_inbound_bytes_per_s=MIN_INBOUND_BYTES_PER_S) as svc, \
            Feed(svc.endpoint) as feed:
        stream, end = feed.generator(), time.monotonic() + QUIET_FEED_S
        while time.monotonic() < end:
            next(stream)
        assert feed.stats["reconnects"] == 0
