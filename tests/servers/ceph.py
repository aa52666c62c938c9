"""A throwaway single-node Ceph cluster with a RADOS Gateway (S3) on 127.0.0.1.

One mon, one OSD keeping its data in RAM (memstore), one radosgw (beast frontend) and one S3 user.
Everything lives under the given work directory: config, mon store, OSD dir, pid files, admin
sockets and logs; nothing is written to /etc/ceph or /var/lib/ceph. Bring-up takes ~2 s.

    rgw = CephRGW().start(tmp_path)
    rgw.create_bucket("data")
    ... rgw.endpoint, rgw.access_key, rgw.secret_key ...
    rgw.stop()

The settings that matter (see /work/shared/REFERENCE.md section 5) are commented in `_config`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
# Daemons in the order they are stopped: a stopping OSD tells the mon first (waiting up to
# osd_mon_shutdown_timeout if the mon is already gone), radosgw needs both.
_DAEMONS = (("client.rgw.a", "radosgw"), ("osd.0", "ceph-osd"), ("mon.a", "ceph-mon"))


class CephUnavailable(RuntimeError):
    """The Ceph binaries are not installed: callers skip rather than fail."""


class CephError(RuntimeError):
    """The cluster did not come up (the message carries the tail of the relevant log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephRGW:
    """A single-node Ceph RGW. `start` returns self; `stop` is idempotent and also runs at exit."""

    def __init__(
        self,
        access_key: str = "AKIDCEPH0001",  # radosgw and rclone refuse keys under 8 characters
        secret_key: str = "SECRET/CEPH0001",  # a '/' on purpose: addresses must escape it as %2F
        memstore_bytes: int = 4 << 30,  # the OSD's RAM "disk"; only what is stored is allocated
        startup_timeout: float = 60.0,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.memstore_bytes = memstore_bytes
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.port = 0
        self.startup_seconds = 0.0
        self._conf = ""
        self._env: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"CephRGW(endpoint={self.endpoint!r}, workdir={str(self.workdir)!r})"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, workdir: Path | str) -> CephRGW:
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise CephUnavailable(
                f"Ceph binaries not found: {', '.join(missing)} "
                "(apt-get install ceph-mon ceph-osd radosgw ceph-common)"
            )
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        self.workdir = Path(workdir).resolve()
        for sub in ("mon/a", "osd/0", "run", "log", "crash", "rgw"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._conf = str(self.workdir / "ceph.conf")
        # CEPH_ARGS / CEPH_CONF from the caller's shell must not point us at another cluster.
        self._env = {k: v for k, v in os.environ.items() if k not in ("CEPH_ARGS", "CEPH_CONF")}
        fsid = str(uuid.uuid4())
        mon_v2, mon_v1, self.port = free_port(), free_port(), free_port()
        mon_addr = f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]"
        Path(self._conf).write_text(self._config(fsid, mon_addr))
        atexit.register(self.stop)
        try:
            monmap = str(self.workdir / "monmap")
            self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, monmap], deadline)
            self._run(["ceph-mon", "-c", self._conf, "--mkfs", "-i", "a", "--monmap", monmap], deadline)
            self._run(["ceph-mon", "-c", self._conf, "-i", "a"], deadline)  # daemonizes
            # `ceph osd new` doubles as the wait for the mon: it blocks until it has a quorum.
            osd_uuid = str(uuid.uuid4())
            self._run(["ceph", "-c", self._conf, "--connect-timeout", "20", "osd", "new", osd_uuid], deadline)
            self._run(["ceph-osd", "-c", self._conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], deadline)
            self._run(["ceph-osd", "-c", self._conf, "-i", "0"], deadline)
            # radosgw starts at once: it creates its pools and waits for the OSD by itself.
            self._run(["radosgw", "-c", self._conf, "-n", "client.rgw.a"], deadline)
            self._wait_http(deadline)
            self._run(
                ["radosgw-admin", "-c", self._conf, "user", "create", "--uid", "test",
                 "--display-name", "test", "--access-key", self.access_key, "--secret", self.secret_key],
                deadline,
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every daemon by its pid file and wait for it to exit (SIGKILL after `timeout`)."""
        if self.workdir is None:
            return
        for name, binary in _DAEMONS:
            pid = self._pid(name, binary)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            if not _wait_exit(pid, time.monotonic() + timeout):
                os.kill(pid, signal.SIGKILL)
                _wait_exit(pid, time.monotonic() + 5)
        atexit.unregister(self.stop)

    def __enter__(self) -> CephRGW:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- conveniences for tests and benchmarks ------------------------------------------------
    def client(self) -> Any:
        """A boto3 S3 client for this gateway (path-style, no optional CRC headers)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)  # Ceph wants 3-63 lower-case DNS-style names

    def address(self, bucket: str, prefix: str = "") -> str:
        """The ossimport/ads-cli address of bucket/prefix here, with the secret percent-escaped."""
        return f"s3://{self.access_key}:{quote(self.secret_key, safe='')}@{bucket}.127.0.0.1:{self.port}/{prefix}"

    # ---- internals ---------------------------------------------------------------------------
    def _config(self, fsid: str, mon_addr: str) -> str:
        w = self.workdir
        return f"""\
[global]
fsid = {fsid}
mon_host = {mon_addr}
# no cephx: a private throwaway cluster on loopback
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# one OSD holds every replica
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
# every path under the work directory, never /var/lib/ceph, /var/run/ceph or /var/log/ceph
run_dir = {w}/run
admin_socket = {w}/run/$name.asok
pid_file = {w}/run/$name.pid
log_file = {w}/log/$name.log
crash_dir = {w}/crash
mon_cluster_log_file = default={w}/log/$cluster.$channel.log cluster={w}/log/$cluster.log
# a nearly full disk must not make the mon refuse to run a test cluster
mon_data_avail_crit = 1
mon_data_avail_warn = 2

[mon]
mon_data = {w}/mon/$id
# propose at once instead of every second: bring-up ~1.5 s instead of ~13 s
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[osd]
osd_data = {w}/osd/$id
osd_objectstore = memstore
memstore_device_bytes = {self.memstore_bytes}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
osd_mon_shutdown_timeout = 1

[client.rgw.a]
# without it radosgw hangs 300 s and dies with "failed to fetch mon config"
ms_mon_client_mode = crc
# tcp_nodelay: otherwise every GET waits ~46 ms for a delayed ACK
rgw_frontends = beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1
rgw_data = {w}/rgw
# collect deleted data within a minute so it leaves RAM
rgw_gc_obj_min_wait = 30
rgw_gc_processor_period = 30
# no per-request log lines: benchmarks run this gateway hard
debug_rgw = 0/0
"""

    def _run(self, args: list[str], deadline: float) -> None:
        try:
            proc = subprocess.run(
                args, env=self._env, capture_output=True, text=True,
                timeout=max(1.0, deadline - time.monotonic()), check=False,
            )
        except subprocess.TimeoutExpired:
            raise CephError(f"{args[0]} did not finish before the start-up deadline{self._log_tail()}") from None
        if proc.returncode != 0:
            raise CephError(
                f"{' '.join(args[:5])} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                f"{self._log_tail()}"
            )

    def _wait_http(self, deadline: float) -> None:
        """Poll the gateway until it answers HTTP (any status), checking the daemons stay alive."""
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # a 4xx is an answer: the gateway is up
            except OSError:
                pass
            for name, binary in _DAEMONS:
                path = self.workdir / "run" / f"{name}.pid" if self.workdir else None
                if path and path.exists() and self._pid(name, binary) is None:
                    raise CephError(f"{name} exited during start-up{self._log_tail(name)}")
            if time.monotonic() > deadline:
                raise CephError(f"radosgw did not answer on {self.endpoint} in time{self._log_tail()}")
            time.sleep(0.05)

    def _pid(self, name: str, binary: str) -> int | None:
        """The live pid from `name`'s pid file, or None (no file, exited, or pid reused)."""
        assert self.workdir is not None
        try:
            pid = int((self.workdir / "run" / f"{name}.pid").read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return None
        if not binary.startswith(comm) or not _alive(pid):
            return None
        return pid

    def _log_tail(self, name: str = "") -> str:
        if self.workdir is None:
            return ""
        out = []
        for daemon, _ in _DAEMONS:
            if name and daemon != name:
                continue
            log = self.workdir / "log" / f"{daemon}.log"
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-15:]
                out.append(f"\n--- {log} ---\n" + "\n".join(lines))
        return "".join(out)


def _alive(pid: int) -> bool:
    """True while `pid` runs. A zombie counts as exited: in containers PID 1 may never reap the
    daemons, which were reparented to it when they daemonized."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_exit(pid: int, deadline: float) -> bool:
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
