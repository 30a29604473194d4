"""CURVE on the client endpoint: key generation, and a ZAP authenticator that logs refusals.

``ringfeed keys DIR`` writes ``server.key``/``server.key_secret``,
``client.key``/``client.key_secret`` and ``authorized/client.key``. The server
takes ``curve_secret_key`` (its secret file) and ``curve_authorized_keys`` (a
folder of client public keys); only those clients complete the handshake.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from client.security import load_keypair

log = logging.getLogger("ringfeed.auth")


class _RefusalsAsWarnings(logging.Filter):
    """pyzmq logs refusals at DEBUG; keep only those, as warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("DENIED"):
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused a client: " + message, ()
        return True


def generate_keys(folder: str) -> dict[str, str]:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    authorized = root / "authorized"
    authorized.mkdir(exist_ok=True, mode=0o700)
    server_public, server_secret = zmq.auth.create_certificates(root, "server")
    client_public, client_secret = zmq.auth.create_certificates(root, "client")
    for secret in (server_secret, client_secret):
        Path(secret).chmod(0o600)
    shutil.copy(client_public, authorized / "client.key")
    return {"server_public": server_public, "server_secret": server_secret,
            "client_public": client_public, "client_secret": client_secret, "authorized": str(authorized)}


def secure_frontend(ctx: zmq.Context, frontend: zmq.Socket, secret_key: str, authorized: str):
    """Make ``frontend`` a CURVE server that admits only the keys in ``authorized``; returns the
    authenticator, which the caller stops."""
    public, secret = load_keypair(secret_key)
    if secret is None:
        raise ValueError(f"{secret_key!r} holds no secret key; pass the server's .key_secret file")
    zap_log = logging.getLogger("ringfeed.auth.zap")
    zap_log.setLevel(logging.DEBUG)
    zap_log.addFilter(_RefusalsAsWarnings())
    authenticator = ThreadAuthenticator(ctx, log=zap_log)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=authorized)
    frontend.curve_server = True
    frontend.curve_publickey, frontend.curve_secretkey = public, secret
    log.info("CURVE on: clients must hold a key from %s", authorized)
    return authenticator
