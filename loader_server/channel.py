"""The link between the broker and one worker: a Unix socketpair made before the worker starts.

A message is the same list of frames as a ZeroMQ multipart message of the
worker protocol (``client/protocol.py``), packed as one record::

    <length:u32> <frames:u16> <frame length:u32>* frame bytes*

Why not ZeroMQ: a worker is always this server's child, and a ZeroMQ message
wakes an I/O thread on each side before its peer sees it, besides wake-ups
for ZeroMQ's own flow-control commands. Measured on a 2-core VM, those
wake-ups cost the broker about 4 polls and 5 ``getpid`` calls per batch, CPU
the workers then lacked. Here a message is one ``send`` and one ``recv``, and
it wakes only a peer that sleeps. Only the two processes hold the ends, so
nothing else can write to a worker or to the broker through them.

Every wait is bounded: the broker's end never blocks (``receive`` takes what
has arrived; a ``send`` that would block means a worker that stopped reading,
which ``ChannelError`` reports), and a worker's sends time out after
``SEND_TIMEOUT_S``. Records are checked as strictly as frames: a length over
``MAX_RECORD_BYTES`` or frames that do not add up raise ``ChannelError``.
"""

from __future__ import annotations

import socket
import struct

MAX_RECORD_BYTES = 1 << 20
MAX_FRAMES = 8
SEND_TIMEOUT_S = 10.0
_LENGTH = struct.Struct("<I")
_COUNT = struct.Struct("<H")
_READ_BYTES = 1 << 16


class ChannelError(Exception):
    """The peer sent something that is not a record, went away, or stopped reading."""


def pair() -> tuple[socket.socket, socket.socket]:
    """(broker end, worker end): the broker's never blocks; the worker's sends time out."""
    broker_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    broker_end.setblocking(False)
    worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                          struct.pack("ll", int(SEND_TIMEOUT_S), 0))
    return broker_end, worker_end


def pack(frames: list[bytes]) -> bytes:
    """One record; a message the peer would refuse is the sender's bug (ValueError)."""
    if len(frames) > MAX_FRAMES:
        raise ValueError(f"{len(frames)} frames in one message, expected at most {MAX_FRAMES}")
    head = _COUNT.pack(len(frames)) + struct.pack(f"<{len(frames)}I", *map(len, frames))
    body = head + b"".join(frames)
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"a record of {len(body)} bytes, expected at most {MAX_RECORD_BYTES}")
    return _LENGTH.pack(len(body)) + body


class Channel:
    """One end of a worker link, with the bytes of a record not yet complete."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False  # the peer closed its end: nothing more will arrive
        self._pending = bytearray()
        self._refused: ChannelError | None = None  # raised once the messages before it are taken

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frames: list[bytes]) -> None:
        try:
            self.sock.sendall(pack(frames))
        except OSError as exc:  # BlockingIOError included: the peer stopped reading
            raise ChannelError(f"cannot send to the peer: {exc}") from exc

    def receive(self) -> list[list[bytes]]:
        """Every complete message that has arrived, without waiting; [] if none. Once the peer
        has closed its end, ``closed`` is set (after the messages it sent before). Bytes that
        are not a record raise ``ChannelError``, after the messages that came before them."""
        if self._refused is not None:
            raise self._refused
        while not self.closed:
            try:
                data = self.sock.recv(_READ_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                raise ChannelError(f"cannot read from the peer: {exc}") from exc
            self.closed = not data
            self._pending += data
            if len(data) < _READ_BYTES:
                break  # drained; what comes later makes the fd readable again
        return self._split()

    def _split(self) -> list[list[bytes]]:
        messages, view, at = [], memoryview(self._pending), 0
        try:
            while len(view) - at >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(view, at)
                if length > MAX_RECORD_BYTES:
                    raise ChannelError(f"a record of {length} bytes, expected at most {MAX_RECORD_BYTES}")
                if len(view) - at - _LENGTH.size < length:
                    break
                start = at + _LENGTH.size
                messages.append(unpack(bytes(view[start:start + length])))
                at = start + length
        except ChannelError as exc:
            if not messages:
                raise
            self._refused = exc
        finally:
            view.release()
        del self._pending[:at]
        return messages

    def close(self) -> None:
        self.sock.close()


def unpack(body: bytes) -> list[bytes]:
    if len(body) < _COUNT.size:
        raise ChannelError(f"a record of {len(body)} bytes has no frame count")
    (count,) = _COUNT.unpack_from(body)
    if count > MAX_FRAMES:
        raise ChannelError(f"a record of {count} frames, expected at most {MAX_FRAMES}")
    head = _COUNT.size + 4 * count
    if len(body) < head:
        raise ChannelError(f"a record of {len(body)} bytes is too short for {count} frame lengths")
    lengths = struct.unpack_from(f"<{count}I", body, _COUNT.size)
    if head + sum(lengths) != len(body):
        raise ChannelError(f"frames of {sum(lengths)} bytes in a record with {len(body) - head} bytes for them")
    frames, at = [], head
    for n in lengths:
        frames.append(body[at:at + n])
        at += n
    return frames
