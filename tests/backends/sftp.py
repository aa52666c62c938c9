"""SFTP backend: a private OpenSSH sshd on 127.0.0.1, key authentication only."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import unavailable

NAME = "sftp"
SSHD = "/usr/sbin/sshd"


@dataclass
class SSHD_Handle:
    proc: subprocess.Popen[bytes]
    port: int
    tmp: Path
    user: str
    client_key: Path
    log: Path
    known_hosts: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ossimport-test", "-f", str(path)],
                   check=True)
    return path


def start(tmp: Path, extra_config: Sequence[str] = ()) -> SSHD_Handle:
    """`extra_config`: more sshd_config lines; one replaces the default line of its keyword (e.g.
    `Subsystem sftp internal-sftp -l INFO`, `SetEnv PATH=...`)."""
    if not os.path.exists(SSHD):
        unavailable("sshd not installed: apt-get install openssh-server")
    host_key = keygen(tmp / "host_ed25519")
    client_key = keygen(tmp / "client_ed25519")
    authorized = tmp / "authorized_keys"
    authorized.write_bytes(client_key.with_suffix(".pub").read_bytes())
    authorized.chmod(0o600)
    (tmp / "sftp-data").mkdir(exist_ok=True)
    port = _free_port()
    config = tmp / "sshd_config"
    defaults = [
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}",
        f"PidFile {tmp / 'sshd.pid'}",
        "StrictModes no",
        "UsePAM no",
        "PermitRootLogin yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "Subsystem sftp internal-sftp",
        "LogLevel ERROR",
    ]
    overridden = {line.split()[0].lower() for line in extra_config}
    lines = [*extra_config, *(line for line in defaults if line.split()[0].lower() not in overridden)]
    config.write_text("\n".join(lines) + "\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    log = tmp / "sshd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"sshd did not listen on port {port}: {log.read_text(errors='replace')}")
            time.sleep(0.02)  # poll interval, bounded by the deadline above
    # the clients' known_hosts (SSH_KNOWN_HOSTS): ossimport refuses a server it does not know
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.with_suffix('.pub').read_text()}")
    return SSHD_Handle(proc, port, tmp, getpass.getuser(), client_key, log, known_hosts)


def stop(handle: SSHD_Handle) -> None:
    handle.proc.terminate()
    try:
        handle.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        handle.proc.kill()
        handle.proc.wait()


def data_dir(handle: SSHD_Handle, root: str) -> Path:
    """The server-side directory behind `address(handle, root)`."""
    return handle.tmp / "sftp-data" / root


def address(handle: SSHD_Handle, root: str) -> str:
    data_dir(handle, root).mkdir(parents=True, exist_ok=True)
    return f"{handle.user}@127.0.0.1:{handle.port}:{data_dir(handle, root)}/"


def env(handle: SSHD_Handle) -> dict[str, str]:
    return {"SSH_PRIVATE_KEY_PATH": str(handle.client_key), "SSH_KNOWN_HOSTS": str(handle.known_hosts)}
