"""CURVE on the client endpoint: key generation, and a ZAP authenticator that logs refusals.

``ringfeed keys DIR`` writes ``server.key``/``server.key_secret``,
``client.key``/``client.key_secret`` and ``authorized/client.key``. The server
takes ``curve_secret_key`` (its secret file) and ``curve_authorized_keys`` (a
folder of client public keys); only those clients complete the handshake.

The folder is re-read when it changes (``AuthorizedKeys.refresh``, checked at
most every ``RELOAD_INTERVAL_S`` from the broker's housekeeping), so adding or
removing a ``.key`` file takes effect without a restart. Revoking a key refuses
that client's *new* connections; a connection already established stays until
it reconnects (stop the server to cut it now). A key file that cannot be read
counts as absent, and a missing folder as an empty one: failures refuse.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ringfeed.security import load_keypair

log = logging.getLogger("ringfeed.auth")

RELOAD_INTERVAL_S = 1.0


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


class AuthorizedKeys:
    """The client public keys in a folder of ``.key`` files: a ZAP credentials provider
    (``callback``, asked from the authenticator's thread) that ``refresh`` keeps current."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self._listing = _listing(self.folder)
        self._by_file = _load_keys(self.folder, self._listing)
        self._keys = frozenset(self._by_file.values())
        self._next_check_s = time.monotonic() + RELOAD_INTERVAL_S

    def __len__(self) -> int:
        return len(self._keys)

    def callback(self, domain: str, client_key: bytes) -> bool:
        return client_key in self._keys

    def refresh(self) -> None:
        """Re-read the folder if its listing changed; at most once per ``RELOAD_INTERVAL_S``."""
        now = time.monotonic()
        if now < self._next_check_s:
            return
        self._next_check_s = now + RELOAD_INTERVAL_S
        listing = _listing(self.folder)
        if listing == self._listing:
            return
        folder_mtime_ns, _ = listing
        if folder_mtime_ns is None:
            log.warning("authorized keys folder %s is gone: refusing every client until it is back",
                        self.folder)
        by_file = _load_keys(self.folder, listing)
        added = sorted(name for name in by_file if self._by_file.get(name) != by_file[name])
        removed = sorted(name for name in self._by_file if name not in by_file)
        self._listing, self._by_file, self._keys = listing, by_file, frozenset(by_file.values())
        log.info("authorized keys in %s changed: added or replaced %s, removed %s; %d key(s) now admitted",
                 self.folder, added, removed, len(self._keys))


def _listing(folder: Path) -> tuple:
    """What the folder holds, cheaply: its mtime and each .key file's name, mtime and size.
    A missing folder lists as ``(None, ())``."""
    try:
        folder_mtime_ns = folder.stat().st_mtime_ns
    except FileNotFoundError:
        return None, ()
    entries = []
    for path in sorted(folder.glob("*.key")):
        try:
            st = path.stat()
        except FileNotFoundError:  # removed while we looked
            continue
        entries.append((path.name, st.st_mtime_ns, st.st_size))
    return folder_mtime_ns, tuple(entries)


def _load_keys(folder: Path, listing: tuple) -> dict[str, bytes]:
    """file name -> z85 public key, for the .key files in ``listing`` that hold one."""
    _, entries = listing
    keys = {}
    for name, _, _ in entries:
        try:
            public, _ = zmq.auth.load_certificate(folder / name)
        except (OSError, ValueError) as exc:
            log.warning("authorized key %s is unreadable and refused: %s", folder / name, exc)
            continue
        if public:
            keys[name] = public
    return keys


def secure_frontend(ctx: zmq.Context, frontend: zmq.Socket, secret_key: str,
                    authorized: str) -> tuple[ThreadAuthenticator, AuthorizedKeys]:
    """Make ``frontend`` a CURVE server that admits only the keys in ``authorized``; returns the
    authenticator, which the caller stops, and the keys, whose ``refresh`` the caller runs."""
    public, secret = load_keypair(secret_key)
    if secret is None:
        raise ValueError(f"{secret_key!r} holds no secret key; pass the server's .key_secret file")
    zap_log = logging.getLogger("ringfeed.auth.zap")
    zap_log.setLevel(logging.DEBUG)
    zap_log.addFilter(_RefusalsAsWarnings())
    keys = AuthorizedKeys(authorized)
    authenticator = ThreadAuthenticator(ctx, log=zap_log)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=keys)
    frontend.curve_server = True
    frontend.curve_publickey, frontend.curve_secretkey = public, secret
    log.info("CURVE on: clients must hold a key from %s (%d now)", authorized, len(keys))
    return authenticator, keys
