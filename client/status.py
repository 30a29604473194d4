"""Ask a ringfeed server for its status (one bounded request; used by ``ringfeed status``)."""

from __future__ import annotations

import zmq

from . import protocol


def query_status(endpoint: str, timeout_s: float = 2.0) -> dict | None:
    """The server's status counters, or ``None`` if nothing answered within ``timeout_s``."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart([protocol.STATUS])
        if not sock.poll(timeout_s * 1000):
            return None
        frames = sock.recv_multipart()
        if frames[0] != protocol.STATUS or len(frames) != 2:
            raise protocol.ProtocolError(f"unexpected reply {frames[0][:32]!r} to STATUS")
        return protocol.decode_json(frames[1], "STATUS")
    finally:
        sock.close(0)
