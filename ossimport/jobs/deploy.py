"""`console.sh deploy`: install ossimport on every host of conf/workers over SSH and start a worker.

Each line of conf/workers is `host`, `host:port` or `user@host[:port]` (# starts a comment). The
package source and the CURVE keys (worker pair, master public key) are uploaded to
`~/ossimport-worker/` (the environment variable OSSIMPORT_DEPLOY_DIR, read when `deploy` runs,
names another directory: relative to the SSH user's home, or absolute). The worker runs from the
unpacked source (`PYTHONPATH=src python3 -m ossimport worker`) with the host's `python3` and its
installed dependencies: nothing is built or downloaded (a `pip install` of the source would need
setuptools and wheel on the host). A host missing a dependency fails the deploy with the import
error. The worker starts in the background; its pid is in `worker.pid`, its output in `worker.log`.
"""

from __future__ import annotations

import io
import os
import shlex
import tarfile
from pathlib import Path

from ossimport.errors import UsageError
from ossimport.jobs.security import ensure_keys, is_loopback_endpoint

REMOTE_DIR = "ossimport-worker"  # relative to the SSH user's home


def remote_dir() -> str:
    """The directory on each host: OSSIMPORT_DEPLOY_DIR if set, else REMOTE_DIR."""
    return os.environ.get("OSSIMPORT_DEPLOY_DIR") or REMOTE_DIR


def read_hosts(path: Path) -> list[tuple[str, str, int | None]]:
    """(user, host, port) per line; user '' means sys.properties workerUserName."""
    if not path.exists():
        raise UsageError(f"{path} does not exist: list one worker host per line")
    hosts = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        user, _, hostport = line.rpartition("@")
        host, _, port = hostport.partition(":")
        hosts.append((user, host, int(port) if port else None))
    if not hosts:
        raise UsageError(f"{path} lists no hosts")
    return hosts


def package_tarball() -> bytes:
    """The ossimport source tree (package + pyproject) as a gzip tarball."""
    root = Path(__file__).resolve().parents[2]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("pyproject.toml", "README.md"):
            tar.add(root / name, arcname=f"src/{name}")
        tar.add(root / "ossimport", arcname="src/ossimport",
                filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return buf.getvalue()


def deploy(sysconf: object, workers_file: Path) -> int:
    import paramiko

    address = sysconf.masterAddress
    keys_dir = Path(sysconf.curveKeysDir)
    hosts = read_hosts(workers_file)
    remote_hosts = [h for _, h, _ in hosts if h not in ("127.0.0.1", "localhost")]
    if remote_hosts and is_loopback_endpoint(address):
        raise UsageError(f"masterAddress {address} is loopback: workers on {', '.join(remote_hosts)} cannot reach "
                         "it; set masterAddress in sys.properties to an address they can reach")
    ensure_keys(keys_dir)
    tarball = package_tarball()
    rdir = remote_dir()
    failures = 0
    for user, host, port in hosts:
        user = user or getattr(sysconf, "workerUserName", "") or "root"
        try:
            client = paramiko.SSHClient()
            client.load_system_host_keys()
            client.set_missing_host_key_policy(paramiko.WarningPolicy())
            key_file = str(sysconf.privateKeyFile) if getattr(sysconf, "privateKeyFile", None) else None
            client.connect(host, port=port or int(getattr(sysconf, "sshPort", 22)), username=user,
                           password=getattr(sysconf, "workerPassword", "") or None, key_filename=key_file,
                           timeout=30, look_for_keys=key_file is None)
            sftp = client.open_sftp()
            _mkdirs(sftp, [rdir, f"{rdir}/keys"])
            sftp.putfo(io.BytesIO(tarball), f"{rdir}/ossimport.tar.gz")
            for name in ("worker.key_secret", "worker.key", "master.key"):
                sftp.put(str(keys_dir / name), f"{rdir}/keys/{name}")
            sftp.chmod(f"{rdir}/keys/worker.key_secret", 0o600)
            sftp.close()
            worker_args = (f"--master {shlex.quote(address)} --curve-keys keys --workdir . "
                           f"--heartbeat {float(getattr(sysconf, 'heartbeatSeconds', 2.0)):g} "
                           f"--max-throughput {int(getattr(sysconf, 'workerMaxThroughput', 0))}")
            script = (
                f"cd {shlex.quote(rdir)} && "
                "(test -f worker.pid && kill $(cat worker.pid) 2>/dev/null; true) && "
                "rm -rf src && tar xzf ossimport.tar.gz && export PYTHONPATH=\"$PWD/src\" && "
                "python3 -c 'import ossimport.jobs.worker' && "  # dependencies present: fail now, not later
                f"(nohup python3 -m ossimport worker {worker_args} "
                "> worker.log 2>&1 < /dev/null & echo $! > worker.pid)"
            )
            _, stdout, stderr = client.exec_command(script, timeout=600)
            status = stdout.channel.recv_exit_status()
            if status != 0:
                last = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(last[0] if last else f"exit status {status}")
            print(f"{host}: worker started")
        except Exception as exc:  # one host failing does not stop the others
            failures += 1
            print(f"{host}: deploy failed: {exc}")
        finally:
            client.close()
    return 1 if failures else 0


def _mkdirs(sftp: object, paths: list[str]) -> None:
    for p in paths:
        try:
            sftp.mkdir(p)  # type: ignore[attr-defined]
        except OSError:
            pass  # exists
