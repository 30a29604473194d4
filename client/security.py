"""CURVE key files (made by ``ringfeed keys``) and the socket options they become."""

from __future__ import annotations

import zmq
import zmq.auth


def load_keypair(path: str) -> tuple[bytes, bytes | None]:
    """(public, secret) from a ZeroMQ certificate file; secret is None for a public key file."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE key file {path!r}: {exc}") from None


def client_curve_options(server_key: str | None, secret_key: str | None) -> dict[int, bytes]:
    """Socket options for a CURVE client. Without ``secret_key`` an ephemeral keypair is used,
    which only a server that accepts any client lets in."""
    if server_key is None:
        if secret_key is not None:
            raise ValueError("curve_secret_key needs curve_server_key (the server's public key file)")
        return {}
    server_public, _ = load_keypair(server_key)
    if secret_key is None:
        public, secret = zmq.curve_keypair()
    else:
        public, secret = load_keypair(secret_key)
        if secret is None:
            raise ValueError(f"{secret_key!r} holds no secret key; pass the client's .key_secret file")
    return {zmq.CURVE_SERVERKEY: server_public, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}
