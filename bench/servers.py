"""Servers the benchmark talks to, all on 127.0.0.1, plus the few S3 helpers the harness needs.

A server is small on purpose: `start(workdir) -> Endpoint`, `stop()`, and `persistent` (does its
data survive a restart?), plus how its buckets are created and listed. `rclone serve s3` is built
in; a Ceph RGW (tests/servers/ceph.py, class CephRGW) is loaded lazily with `--server ceph`, and
Azurite (tests/servers/azurite.py) for the Azure scenarios. `SshServer` is a private OpenSSH sshd for the SFTP
scenarios; its Endpoint's `extra` carries the user, the client key file and the data folder.
"""

from __future__ import annotations

import contextlib
import getpass
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "BENCHAK01"
SECRET_KEY = "BENCHSECRET01"
HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Server:
    """Base class: a server this process starts and must stop."""

    name = "server"
    persistent = False  # data survives stop()/start() on the same workdir

    def start(self, workdir: Path) -> Endpoint:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    def create_bucket(self, endpoint: Endpoint, bucket: str) -> None:
        create_bucket(endpoint, bucket)

    def iter_objects(self, endpoint: Endpoint, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        """Objects as S3 lists them: dicts with Key, Size and LastModified."""
        return iter_objects(endpoint, bucket, prefix)

    def wipe_bucket(self, endpoint: Endpoint, bucket: str) -> None:
        """Delete a bucket and everything in it (generic S3 way)."""
        client = s3_client(endpoint)
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, PaginationConfig={"MaxItems": 10_000_000}):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        with contextlib.suppress(Exception):
            client.delete_bucket(Bucket=bucket)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(host: str, port: int, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until the port answers any HTTP response, or raise after `deadline_s` seconds."""
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return
        except OSError as e:
            last = str(e)
        finally:
            conn.close()
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not ready after {deadline_s:.0f}s ({last})")


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop a process started with start_new_session=True: SIGTERM its group, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


class RcloneS3Server(Server):
    """`rclone serve s3` over a directory; buckets are its top-level folders."""

    name = "rclone-serve-s3"
    persistent = True

    def __init__(self, rclone: str) -> None:
        self.rclone = rclone
        self.proc: subprocess.Popen[bytes] | None = None
        self.datadir: Path | None = None
        self.log: Path | None = None

    def version(self) -> str:
        out = subprocess.run([self.rclone, "version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        self.datadir = workdir / "data"
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "server.log"
        port = free_port()
        argv = [
            self.rclone, "serve", "s3", "--addr", f"{HOST}:{port}",
            "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--force-path-style", "--etag-hash", "MD5",
            str(self.datadir),
        ]  # fmt: skip
        env = clean_env()
        env["RCLONE_CONFIG"] = os.devnull
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_http(HOST, port, 30.0, self.proc)
        except BaseException:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop()
            raise RuntimeError(f"rclone serve s3 did not start: {tail}") from None
        return Endpoint(HOST, port, ACCESS_KEY, SECRET_KEY)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def wipe_bucket(self, endpoint: Endpoint, bucket: str) -> None:
        # Buckets are plain folders: removing one is far faster than deleting object by object.
        # Names are never reused, so the server's directory cache cannot serve a stale bucket.
        if self.datadir is not None and (self.datadir / bucket).is_dir():
            shutil.rmtree(self.datadir / bucket, ignore_errors=True)
        else:
            super().wipe_bucket(endpoint, bucket)


class CephServer(Server):
    """Adapter for tests/servers/ceph.py's CephRGW (memstore: data is lost on restart)."""

    name = "ceph-rgw"
    persistent = False

    def __init__(self) -> None:
        self.rgw: Any = None

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        tests_dir = str(REPO / "tests")
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        from servers.ceph import CephRGW  # lazy: only with --server ceph

        try:  # big1g runs leave up to a few GiB in RAM until RGW's garbage collector frees them
            self.rgw = CephRGW(memstore_bytes=12 << 30)
        except TypeError:
            self.rgw = CephRGW()
        info = self.rgw.start(workdir)
        return endpoint_from(info if info is not None else self.rgw, self.rgw)

    def stop(self) -> None:
        if self.rgw is not None:
            rgw, self.rgw = self.rgw, None
            rgw.stop()


class AzuriteServer(Server):
    """Azure Blob through tests/servers/azurite.py's Azurite (one emulator per scenario); its
    containers are the buckets. The Endpoint's keys are the emulator's account and key, and
    `extra["service"]` is "azure"."""

    name = "azurite"
    persistent = False

    def __init__(self) -> None:
        self.azurite: Any = None

    def _module(self) -> Any:
        tests_dir = str(REPO / "tests")
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        from servers import azurite  # lazy: only for the Azure scenarios

        return azurite

    def available(self) -> str:
        """'' when Azurite can start here, else why not."""
        return "" if self._module().azurite_bin() else "Azurite not installed (npm install --prefix .azurite azurite)"

    def version(self) -> str:
        binary = self._module().azurite_bin()
        if not binary:
            return ""
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        return f"azurite {out.stdout.strip()}"

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        azurite = self._module()
        workdir.mkdir(parents=True, exist_ok=True)
        self.azurite = azurite.Azurite(workdir).start()
        return Endpoint(HOST, self.azurite.port, azurite.ACCOUNT, azurite.KEY, extra={"service": "azure"})

    def stop(self) -> None:
        if self.azurite is not None:
            server, self.azurite = self.azurite, None
            server.stop()

    def create_bucket(self, endpoint: Endpoint, bucket: str) -> None:
        self.azurite.container_client(bucket).create_container()

    def iter_objects(self, endpoint: Endpoint, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        for blob in self.azurite.container_client(bucket).list_blobs(name_starts_with=prefix):
            yield {"Key": blob.name, "Size": blob.size, "LastModified": blob.last_modified}

    def wipe_bucket(self, endpoint: Endpoint, bucket: str) -> None:
        self.azurite.container_client(bucket).delete_container()


SSHD = "/usr/sbin/sshd"


def wait_ssh_banner(port: int, deadline_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll until the port sends an SSH identification line, or raise after `deadline_s` seconds."""
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise TimeoutError(f"sshd on {HOST}:{port} not ready after {deadline_s:.0f}s ({last})")


class SshServer(Server):
    """A private OpenSSH sshd on 127.0.0.1 for the SFTP scenarios (as in tests/backends/sftp.py).

    It runs as the current user with a generated ed25519 host key and accepts only a generated
    client key (no PAM, no passwords). Its data folder is plain local disk: `Endpoint.extra` has
    `user`, `key_file` (the client's private key), `known_hosts` (a file holding the server's host
    key) and `root` (an absolute folder to write into).
    """

    name = "openssh-sshd"
    persistent = False

    def __init__(self, sshd: str = SSHD) -> None:
        self.sshd = sshd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def version(self) -> str:
        ssh = shutil.which("ssh")
        if not ssh:
            return ""
        out = subprocess.run([ssh, "-V"], capture_output=True, text=True, timeout=30)
        lines = (out.stderr or out.stdout).strip().splitlines()
        return lines[0] if lines else ""

    @staticmethod
    def available() -> str:
        """'' when sshd and ssh-keygen are installed, else what is missing."""
        missing = [p for p in (SSHD, "ssh-keygen") if not shutil.which(p)]
        return f"not installed: {', '.join(missing)} (apt-get install openssh-server)" if missing else ""

    @staticmethod
    def keygen(path: Path) -> Path:
        path.unlink(missing_ok=True)
        path.with_suffix(".pub").unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ossimport-bench", "-f", str(path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return path

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        why = self.available()
        if why:
            raise RuntimeError(f"the SFTP scenarios need OpenSSH: {why}")
        conf = workdir / "sshd"
        conf.mkdir(parents=True, exist_ok=True)
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        host_key = self.keygen(conf / "host_ed25519")
        client_key = self.keygen(conf / "client_ed25519")
        authorized = conf / "authorized_keys"
        authorized.write_bytes(client_key.with_suffix(".pub").read_bytes())
        authorized.chmod(0o600)
        port = free_port()
        config = conf / "sshd_config"
        config.write_text(
            "\n".join([
                f"ListenAddress {HOST}",
                f"Port {port}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {conf / 'sshd.pid'}",
                "StrictModes no",
                "UsePAM no",
                "PermitRootLogin yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                # 16 parallel connections from one tool must not be dropped as a connection flood
                "MaxStartups 200",
                "MaxSessions 200",
                "UseDNS no",
                # bash skips ~/.bashrc with SHLVL>=1: a remote command (rclone's md5sum per file)
                # must not pay for whatever this host's shell setup does (here: pyenv, ~0.17 s)
                "SetEnv SHLVL=1",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "",
            ])
        )  # fmt: skip
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        self.log = conf / "sshd.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=clean_env(), start_new_session=True,
            )  # fmt: skip
        try:
            wait_ssh_banner(port, 30.0, self.proc)
        except BaseException:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop()
            raise RuntimeError(f"sshd did not start: {tail}") from None
        # ossimport refuses an SFTP server it does not know: its clients get this known_hosts
        known_hosts = conf / "known_hosts"
        known_hosts.write_text(f"[{HOST}]:{port} {host_key.with_suffix('.pub').read_text()}")
        extra = {"user": getpass.getuser(), "key_file": str(client_key), "root": str(data.resolve()),
                 "known_hosts": str(known_hosts)}
        return Endpoint(HOST, port, "", "", extra=extra)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def wipe_bucket(self, endpoint: Endpoint, bucket: str) -> None:
        shutil.rmtree(Path(endpoint.extra["root"]) / bucket, ignore_errors=True)


def endpoint_from(*objs: Any) -> Endpoint:
    """Build an Endpoint from whatever a server helper returns (object or dict, common names)."""

    def get(*names: str) -> Any:
        for obj in objs:
            for n in names:
                val = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
                if val not in (None, ""):
                    return val
        return None

    url = get("endpoint_url", "endpoint", "url")
    host, port = get("host") or HOST, get("port")
    if isinstance(url, str) and "://" in url:
        hostport = url.split("://", 1)[1].rstrip("/")
        host, _, p = hostport.rpartition(":")
        port = int(p)
    ak = get("access_key", "access_key_id", "ak") or ACCESS_KEY
    sk = get("secret_key", "secret_access_key", "sk") or SECRET_KEY
    if port is None:
        raise RuntimeError("cannot tell the server's port")
    if host not in (HOST, "localhost"):
        raise RuntimeError(f"server is not on {HOST}: {host}")
    return Endpoint(HOST, int(port), str(ak), str(sk))


def make_server(name: str, rclone: str | None) -> Server:
    if name == "rclone":
        if not rclone:
            raise RuntimeError("rclone not found")
        return RcloneS3Server(rclone)
    if name == "ceph":
        return CephServer()
    raise ValueError(f"unknown server {name!r} (rclone, ceph)")


# ----------------------------------------------------------------------------- S3 helpers


def clean_env() -> dict[str, str]:
    """The environment for child processes: no proxies, no stray AWS/rclone/s3cmd settings."""
    drop = ("AWS_", "RCLONE_", "S3CMD_", "BOTO_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(drop) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def s3_client(endpoint: Endpoint) -> Any:
    import boto3
    from botocore.config import Config

    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        os.environ.pop(k, None)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=16,
        ),
    )


def create_bucket(endpoint: Endpoint, bucket: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=bucket)


def iter_objects(endpoint: Endpoint, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    client = s3_client(endpoint)
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"MaxItems": 10_000_000}):
        yield from page.get("Contents", [])
