"""CurveZMQ: key files, and CURVE authentication and encryption on our sockets.

``distbelief keys generate DIR`` writes (pyzmq's certificate format, secrets mode 0600)::

    DIR/server.key            the servers' public key: every process needs it
    DIR/server.key_secret     the servers' key pair: shards and the averager
    DIR/client.key_secret     the key pair a client uses (replicas, the averager's
                              pulls, status, evaluate, up)
    DIR/NAME.key_secret       one more client key pair per ``--client NAME``; copy it
                              to another host's folder as its client.key_secret
    DIR/clients/NAME.key      the public keys the servers admit, one per client pair

With ``--curve DIR`` a server turns CURVE on for its ROUTER socket and runs a ZAP
authenticator that admits only the public keys in ``DIR/clients/``; a client turns
it on for every DEALER with the server's public key and its own key pair. A peer
without a key, or with one not listed, never gets a reply: libzmq drops the
handshake, the server counts it, and the client gives up after its timeout with
"unreachable or not authorised".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

SERVER = "server"
CLIENT = "client"
ALLOWED = "clients"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class CurveError(ValueError):
    """A key folder that is missing, incomplete or unreadable."""


def generate_keys(directory: Path, clients: tuple[str, ...] = (CLIENT,), force: bool = False):
    """Write the server key pair and one client key pair per name; return the paths.

    Refuses to overwrite existing keys unless ``force``: replacing the server's pair
    locks every client out until it gets the new public key.
    """
    if not zmq.has("curve"):
        raise CurveError("this libzmq was built without CURVE support")
    directory = Path(directory)
    names = list(dict.fromkeys(clients))
    for name in names:
        if not name or "/" in name or name.startswith(".") or name == SERVER:
            raise CurveError(f"bad client name {name!r}: a plain file name other than 'server'")
    allowed = directory / ALLOWED
    existing = [p for p in (directory / f"{SERVER}.key_secret",) if p.exists()]
    if existing and not force:
        raise CurveError(f"{existing[0]} exists; use --force to replace the keys in {directory}")
    allowed.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # secret keys are never readable by others, not even briefly
    try:
        written = [Path(p) for p in zmq.auth.create_certificates(directory, SERVER)]
        for name in names:
            public, secret = zmq.auth.create_certificates(directory, name)
            # the servers admit this client: its public key goes to the allow list
            Path(public).replace(allowed / f"{name}.key")
            written += [allowed / f"{name}.key", Path(secret)]
    finally:
        os.umask(old_umask)
    for path in written:
        if not path.name.endswith(".key_secret"):
            os.chmod(path, 0o644)  # public keys may be read by anyone
    return written


@dataclass(frozen=True)
class Curve:
    """The keys one process uses, read from a key folder."""

    directory: Path
    server_public: bytes
    own_public: bytes
    own_secret: bytes
    is_server: bool

    @classmethod
    def load(cls, directory: str | Path, *, server: bool) -> Curve:
        """The server's keys (``server=True``) or this client's, from ``directory``."""
        directory = Path(directory)
        server_public, _ = _read(directory / f"{SERVER}.key")
        pair = directory / (f"{SERVER}.key_secret" if server else f"{CLIENT}.key_secret")
        public, secret = _read(pair)
        if secret is None:
            raise CurveError(f"{pair} holds no secret key")
        if server and not (directory / ALLOWED).is_dir():
            raise CurveError(f"{directory / ALLOWED} (the admitted client keys) is missing")
        return cls(directory, server_public, public, secret, server)

    def admitted(self) -> int:
        return len(list((self.directory / ALLOWED).glob("*.key")))

    def secure_client(self, sock: zmq.Socket) -> None:
        """Turn CURVE on for a client socket (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.own_public
        sock.curve_secretkey = self.own_secret

    def secure_server(self, sock: zmq.Socket) -> None:
        """Turn CURVE on for a server socket (before it binds)."""
        sock.curve_server = True
        sock.curve_publickey = self.own_public
        sock.curve_secretkey = self.own_secret

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """A started ZAP authenticator admitting only the keys in ``clients/``."""
        auth = ThreadAuthenticator(context, log=logging.getLogger("distbelief.curve.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(self.directory / ALLOWED))
        log.info("CURVE on: admitting %d client key(s) from %s", self.admitted(), self.directory)
        return auth


def _read(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(
            f"cannot read CURVE key {path}: {exc} (make keys with `distbelief keys generate DIR`)"
        ) from None


def warn_if_exposed(bind: str, curve: Curve | None, what: str) -> None:
    """Warn when a server listens beyond loopback without CURVE."""
    if curve is None and bind not in LOOPBACK:
        log.warning(
            "%s listens on %s without --curve: anyone who can reach it can read and change "
            "the weights (make keys with `distbelief keys generate DIR`, pass --curve DIR)",
            what,
            bind,
        )
