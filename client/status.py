"""Ask a ringfeed server for its status (one bounded request; used by ``ringfeed status``)."""

from __future__ import annotations

import zmq

from . import protocol
from .paths import check_endpoint, ipc_socket_path
from .security import client_curve_options

STATUS_TIMEOUT_S = 2.0
STATUS_FRAME_SLACK_BYTES = 1024


def query_status(endpoint: str, timeout_s: float = STATUS_TIMEOUT_S, curve_server_key: str | None = None,
                 curve_secret_key: str | None = None) -> dict | None:
    """The server's status counters, or ``None`` if nothing answered within ``timeout_s`` (at
    once when an ipc endpoint's socket file does not exist). ``ValueError`` for an endpoint that
    is not ``ipc://PATH`` or ``tcp://HOST:PORT``. A CURVE server needs its public key and an
    authorised client secret key file."""
    check_endpoint(endpoint)
    socket_path = ipc_socket_path(endpoint)
    if socket_path is not None and not socket_path.exists():
        return None  # no server made it: nothing can answer, however long we wait
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A reply is one JSON frame: a peer sending more is disconnected before we hold it.
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_JSON_BYTES + STATUS_FRAME_SLACK_BYTES)
    for option, value in client_curve_options(curve_server_key, curve_secret_key).items():
        sock.setsockopt(option, value)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ValueError(f"endpoint {endpoint!r} cannot be connected to: {exc}") from None
        sock.send_multipart([protocol.STATUS])
        if not sock.poll(timeout_s * 1000):
            return None
        frames = sock.recv_multipart()
        if frames[0] != protocol.STATUS or len(frames) != 2:
            raise protocol.ProtocolError(f"unexpected reply {frames[0][:32]!r} to STATUS")
        return protocol.decode_json(frames[1], "STATUS")
    finally:
        sock.close(0)
