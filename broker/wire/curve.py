"""CURVE authentication for a `tcp://` frontend: who may talk to the broker over a network.

An `ipc://` frontend is guarded by file permissions (a 0700 directory). A TCP port is
open to whoever can reach it, and whoever talks to the broker spends the provider keys
its workers hold. So a `tcp://` frontend requires ZeroMQ CURVE: the broker has a key
pair, each client has its own, and only clients whose public key lies in the broker's
allowed-clients directory get through (checked by a ZAP handler thread); the traffic is
encrypted. `isopool keygen` makes the key pairs (ZeroMQ certificate files).

Clients find their keys in `ISOPOOL_CLIENT_KEY` (their own secret certificate)
and `ISOPOOL_BROKER_KEY` (the broker's public certificate).
"""

from __future__ import annotations

import os

import msgspec
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..endpoints import ensure_private_dir
from ..errors import ConfigError


class KeyPair(msgspec.Struct, frozen=True):
    public: bytes
    secret: bytes


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write `NAME.key` (public, to hand out) and `NAME.key_secret` into a 0700 directory of ours.

    The secret file is created 0600 before pyzmq writes the key into it (written through the
    umask and chmodded afterwards, it was readable by others for a moment), and an existing one
    is never overwritten: ConfigError says so."""
    ensure_private_dir(directory, "write secret keys there", "choose a directory of your own")
    secret = os.path.join(directory, f"{name}.key_secret")
    try:
        os.close(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        raise ConfigError(f"{secret} exists already: keep using it, or remove it to make a new pair") from None
    return zmq.auth.create_certificates(directory, name)


def load_pair(path: str, what: str) -> KeyPair:
    """A secret certificate's key pair; ConfigError naming `what` if it is missing or public only."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read the certificate {path!r}: {exc}") from None
    if not secret:
        raise ConfigError(f"{what}: {path!r} holds no secret key (use the NAME.key_secret file of `isopool keygen`)")
    return KeyPair(public, secret)


def load_public(path: str, what: str) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read the certificate {path!r}: {exc}") from None


def check_server_keys(server_key: str, clients_dir: str) -> None:
    """ConfigError unless the broker's secret certificate and the allowed clients' keys are there."""
    load_pair(server_key, "setting curve_server_key")
    if not os.path.isdir(clients_dir) or not any(f.endswith(".key") for f in os.listdir(clients_dir)):
        raise ConfigError(f"setting curve_clients_dir: {clients_dir!r} holds no client public keys (*.key)")


class CurveServer:
    """The broker's side: its key pair on the frontend and a ZAP thread admitting allowed clients."""

    def __init__(self, ctx: zmq.Context, server_key: str, clients_dir: str) -> None:
        self.keys = load_pair(server_key, "setting curve_server_key")
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=clients_dir)

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` (before it binds) a CURVE server."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def secure_client(sock: zmq.Socket, url: str, env: dict[str, str] | None = None) -> bool:
    """Give a client socket (before it connects) its CURVE keys if `url` is tcp:// and keys are set;
    whether it has them."""
    env = os.environ if env is None else env
    client, server = env.get("ISOPOOL_CLIENT_KEY"), env.get("ISOPOOL_BROKER_KEY")
    if not url.startswith("tcp://") or not (client or server):
        return False
    if not (client and server):
        raise ConfigError("CURVE needs both ISOPOOL_CLIENT_KEY and ISOPOOL_BROKER_KEY")
    keys = load_pair(client, "ISOPOOL_CLIENT_KEY")
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = load_public(server, "ISOPOOL_BROKER_KEY")
    return True
