"""How much memory a ROUTER (MAXMSGSIZE 1 MiB) holds for one unfinished multipart message.

A raw TCP peer speaks ZMTP 3.0 (NULL mechanism) and sends frames that all carry
MORE, so the message never completes. libzmq 4.3.5 checks ZMQ_MAXMSGSIZE per
frame (``v2_decoder_t::size_ready``) and its pipe HWM counts complete messages
only (``pipe_t::write`` counts a message when MORE is clear), so nothing stops
it. A frame under 33 bytes costs a 64-byte ``msg_t``: about 21x its wire bytes.
Disconnecting frees it all (``pipe_t::rollback``): glibc's heap in use
(mallinfo2) falls back, though RSS may not.

Run: python benchmarks/pending_message_probe.py  (loopback only, about 15 s)
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import socket
import struct
import time

import zmq

SETTLE_S = 1.0
QUEUE_TIMEOUT_S = 10.0
POLL_MS = 100
HANDSHAKE_TIMEOUT_S = 10.0
GREETING_BYTES = 64


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_mib() -> float:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def server(replies, asks, stop) -> None:
    """A ROUTER as the service sets it up; answers each ask with (heap in use, messages received)."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    replies.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    received = 0
    while not stop.is_set():
        if sock.poll(POLL_MS):
            received += 1
            sock.recv_multipart()
        while not asks.empty():
            asks.get()
            replies.put((heap_in_use_mib(), received))


def _recv_exactly(peer: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = peer.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(f"the server closed the connection during the handshake, "
                                       f"{len(data)} of {n} bytes read")
        data += chunk
    return data


def zmtp_peer(port: int) -> socket.socket:
    """A TCP connection past the ZMTP 3.0 NULL handshake, as a DEALER.

    Our READY goes only once the server's has come: libzmq takes a frame that arrives before it
    has sent its own READY for a handshake command, and fails the handshake."""
    peer = socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S)
    peer.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    _recv_exactly(peer, GREETING_BYTES)
    _flags, size = _recv_exactly(peer, 2)  # a short command: flags 0x04, then its size
    _recv_exactly(peer, size)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    peer.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return peer


def more_frame(size: int) -> bytes:
    if size < 256:
        return b"\x01" + bytes([size]) + b"x" * size
    return b"\x03" + struct.pack(">Q", size) + b"x" * size


def measure(frame_bytes: int, wire_mib: int) -> None:
    replies, asks, stop = mp.Queue(), mp.Queue(), mp.Event()
    proc = mp.Process(target=server, args=(replies, asks, stop))
    proc.start()
    port = replies.get(timeout=QUEUE_TIMEOUT_S)

    def sample():
        time.sleep(SETTLE_S)
        asks.put(None)
        heap, received = replies.get(timeout=QUEUE_TIMEOUT_S)
        return rss_mib(proc.pid), heap, received

    rss0, heap0, _ = sample()
    frame = more_frame(frame_bytes)
    chunk = frame * max(1, (1 << 20) // len(frame))
    peer, sent = zmtp_peer(port), 0
    while sent < wire_mib << 20:
        peer.sendall(chunk)
        sent += len(chunk)
    rss1, heap1, received = sample()
    peer.close()
    rss2, heap2, _ = sample()
    stop.set()
    proc.join(QUEUE_TIMEOUT_S)
    print(f"{sent // len(frame):>8} frames of {frame_bytes:>7} B ({sent / 2**20:5.1f} MiB on the wire): "
          f"heap in use {heap0:5.1f} -> {heap1:6.1f} MiB (x{(heap1 - heap0) / (sent / 2**20):4.1f} the wire), "
          f"{heap2:5.1f} after disconnect; RSS {rss0:5.1f} -> {rss1:6.1f} -> {rss2:6.1f} MiB; "
          f"messages the application received: {received}")


if __name__ == "__main__":
    print(f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}")
    measure(1 << 20, 256)
    measure(1, 4)
    measure(40, 16)
