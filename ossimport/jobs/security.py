"""ZeroMQ CURVE on every master socket, loopback included: a worker must present a key the master
knows, and all traffic (tasks carry storage credentials) is encrypted. On loopback too, because any
local user can reach a loopback port: without a key they could take tasks (and their credentials)
or report a task done that copied nothing.

Key directory (sys.properties curveKeysDir), in ZeroMQ's certificate format:
    master.key, master.key_secret       the master's pair
    worker.key, worker.key_secret       the pair `console deploy` gives the workers
    authorized/                         public keys allowed to connect (worker.key is put there)
`console start` creates the keys (directory 0700, secret files 0600) and gives them to the local
workers it starts; `console deploy` copies the worker pair and master.key to each host.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ossimport.address import is_loopback_host
from ossimport.errors import UsageError


def is_loopback_endpoint(endpoint: str) -> bool:
    """tcp://127.0.0.1:port, tcp://localhost:port, tcp://[::1]:port, ipc://..."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    return is_loopback_host(endpoint.split("://", 1)[-1].rsplit(":", 1)[0])


def ensure_keys(keys_dir: Path) -> None:
    """Create the master and worker key pairs once (0600 secrets in a 0700 directory)."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)  # before any secret is written into it (mkdir's mode is masked by umask)
    for name in ("master", "worker"):
        secret = keys_dir / f"{name}.key_secret"
        if not secret.exists():
            zmq.auth.create_certificates(str(keys_dir), name)
        os.chmod(secret, 0o600)  # every time: also a secret an older version left readable
    authorized = keys_dir / "authorized"
    authorized.mkdir(exist_ok=True)
    # copied every time: a worker pair made anew (its secret was deleted) must replace the old one
    shutil.copy(keys_dir / "worker.key", authorized / "worker.key")


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise UsageError(f"CURVE key {path} is missing: run 'console.sh deploy' or copy the keys directory")
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise UsageError(f"{path} holds no secret key")
    return public, secret_key


@dataclass
class CurveServer:
    """The master side: an authenticator thread plus the server keys on the ROUTER socket."""

    keys_dir: Path

    def start(self, ctx: zmq.Context, sock: zmq.Socket) -> ThreadAuthenticator:
        public, secret = _load(self.keys_dir / "master.key_secret", secret=True)
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.keys_dir / "authorized"))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        return auth


@dataclass
class CurveClientKeys:
    """The worker side: its own pair and the master's public key."""

    keys_dir: Path

    def apply(self, sock: zmq.Socket) -> None:
        public, secret = _load(self.keys_dir / "worker.key_secret", secret=True)
        server_public, _ = _load(self.keys_dir / "master.key", secret=False)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public
