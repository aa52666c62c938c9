"""`console.sh deploy [--trust-new-hosts]`: install ossimport on every host of conf/workers over SSH
and start a worker.

Each line of conf/workers is `host`, `host:port` or `user@host[:port]` (# starts a comment). Per host:
1. SSH, checking the host key against ~/.ssh/known_hosts (and /etc/ssh/ssh_known_hosts). An unknown
   host is refused unless `--trust-new-hosts`, which records its key in ~/.ssh/known_hosts; a key
   that differs from the recorded one is always refused.
2. Ask the host's `python3` for its version and platform (HOST_NEEDS is all a host needs).
3. Upload the wheels for that Python and platform (jobs/wheels.py: built or downloaded here, cached
   in the working directory) and the CURVE keys: the worker pair and master.key, the secret file
   created empty with mode 0600 in a 0700 directory before its content is written.
4. Stop the worker a previous deploy started, make a new venv, `pip install --no-index
   --find-links` from the uploaded wheels (no internet needed), start the worker from the venv.
All in `~/ossimport-worker/` (the environment variable OSSIMPORT_DEPLOY_DIR, read when `deploy`
runs, names another directory: relative to the SSH user's home, or absolute). The worker runs in
the background; its pid is in `worker.pid`, its output in `worker.log`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ossimport.errors import OssimportError, UsageError
from ossimport.jobs.security import ensure_keys, is_loopback_endpoint
from ossimport.jobs.wheels import PROBE, Target, wheels_for

REMOTE_DIR = "ossimport-worker"  # relative to the SSH user's home
HOST_NEEDS = ("a worker host needs Python 3.11 or newer with the venv module as `python3` "
              "(on Debian/Ubuntu: apt-get install python3-venv)")


class DeployError(OssimportError):
    code = "DeployError"


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


def deploy(sysconf: Any, workers_file: Path, trust_new_hosts: bool = False) -> int:
    address = sysconf.masterAddress
    keys_dir = Path(sysconf.curveKeysDir)
    hosts = read_hosts(workers_file)
    remote_hosts = [h for _, h, _ in hosts if h not in ("127.0.0.1", "localhost")]
    if remote_hosts and is_loopback_endpoint(address):
        raise UsageError(f"masterAddress {address} is loopback: workers on {', '.join(remote_hosts)} cannot reach "
                         "it; set masterAddress in sys.properties to an address they can reach")
    ensure_keys(keys_dir)
    worker_args = (f"--master {shlex.quote(address)} --curve-keys keys --workdir . "
                   f"--heartbeat {float(getattr(sysconf, 'heartbeatSeconds', 2.0)):g} "
                   f"--max-throughput {int(getattr(sysconf, 'workerMaxThroughput', 0))}")
    built: dict[Target, list[Path]] = {}  # hosts alike share one build

    def wheels(target: Target) -> list[Path]:
        if target not in built:
            built[target] = wheels_for(Path(sysconf.workingDir) / "wheels", target)
        return built[target]

    failures = 0
    for user, host, port in hosts:
        try:
            with _connect(sysconf, user, host, port, trust_new_hosts) as client:
                _install(client, keys_dir, wheels, worker_args)
            print(f"{host}: worker started")
        except Exception as exc:  # one host failing does not stop the others
            failures += 1
            print(f"{host}: deploy failed: {exc}")
    return 1 if failures else 0


# ---- SSH, with host keys checked ---------------------------------------------------------------------------
def known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def fingerprint(key: Any) -> str:
    """As OpenSSH prints it: SHA256:<base64 without padding>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _host_key_policy(trust_new: bool) -> Any:
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            path = known_hosts()
            if not trust_new:
                raise DeployError(f"the host key of {hostname} ({key.get_name()} {fingerprint(key)}) is not in "
                                  f"{path}: check the fingerprint, then run 'console.sh deploy --trust-new-hosts' "
                                  "to record it")
            path.parent.mkdir(mode=0o700, exist_ok=True)
            with open(path, "a", encoding="ascii") as f:  # appended: the user's own lines stay as they are
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            client.get_host_keys().add(hostname, key.get_name(), key)
            print(f"{hostname}: new host key {key.get_name()} {fingerprint(key)} recorded in {path}")

    return Policy()


def _connect(sysconf: Any, user: str, host: str, port: int | None, trust_new: bool) -> Any:
    import paramiko

    client = paramiko.SSHClient()
    for path in (Path("/etc/ssh/ssh_known_hosts"), known_hosts()):
        if path.exists():
            client.load_system_host_keys(str(path))
    client.set_missing_host_key_policy(_host_key_policy(trust_new))
    key_file = str(sysconf.privateKeyFile) if getattr(sysconf, "privateKeyFile", None) else None
    port = port or int(getattr(sysconf, "sshPort", 22))
    try:
        client.connect(host, port=port,
                       username=user or getattr(sysconf, "workerUserName", "") or "root",
                       password=getattr(sysconf, "workerPassword", "") or None, key_filename=key_file,
                       timeout=30, look_for_keys=key_file is None)
    except paramiko.BadHostKeyException as exc:
        client.close()
        name = host if port == 22 else f"[{host}]:{port}"  # as known_hosts names it
        raise DeployError(f"the host key of {name} ({exc.key.get_name()} {fingerprint(exc.key)}) differs "
                          f"from the one in {known_hosts()}: another machine, or someone in between; if the host "
                          f"was reinstalled, remove its old key (ssh-keygen -R '{name}') and deploy again") from None
    except BaseException:
        client.close()
        raise
    return client


# ---- on the host -----------------------------------------------------------------------------------------
def _install(client: Any, keys_dir: Path, wheels: Callable[[Target], list[Path]], worker_args: str) -> None:
    status, out, _ = _run(client, f"python3 -c {shlex.quote(PROBE)}")
    try:
        target, has_venv = Target.from_probe(out)
    except (ValueError, KeyError, IndexError):
        raise DeployError(HOST_NEEDS) from None  # no python3, or one too old to run the probe
    if status != 0 or not has_venv or target.python < (3, 11):
        raise DeployError(HOST_NEEDS)
    files = wheels(target)
    rdir = shlex.quote(remote_dir())
    # keys/ made private before any secret goes in; wheels.new/ empty for this deploy's set
    _check(client, f"mkdir -p {rdir} && cd {rdir} && (umask 077 && mkdir -p keys) && chmod 700 keys && "
                   "rm -rf wheels.new && mkdir wheels.new")
    sftp = client.open_sftp()
    try:
        sftp.chdir(remote_dir())
        _put_secret(sftp, (keys_dir / "worker.key_secret").read_bytes(), "keys/worker.key_secret")
        for name in ("worker.key", "master.key"):
            sftp.put(str(keys_dir / name), f"keys/{name}")
        for path in files:
            sftp.put(str(path), f"wheels.new/{path.name}")
    finally:
        sftp.close()
    # src/ and ossimport.tar.gz: what deploys before the venv left behind
    _check(client, f"cd {rdir} && (test -f worker.pid && kill $(cat worker.pid) 2>/dev/null; true) && "
                   "rm -rf venv wheels src ossimport.tar.gz && mv wheels.new wheels && "
                   "python3 -m venv venv && "
                   "venv/bin/python -m pip install -q --disable-pip-version-check --no-compile --no-index "
                   "--find-links wheels ossimport && "
                   f"(nohup \"$PWD/venv/bin/python\" -m ossimport worker {worker_args} "
                   "> worker.log 2>&1 < /dev/null & echo $! > worker.pid)")


def _put_secret(sftp: Any, content: bytes, path: str) -> None:
    """Create (or empty) the file, make it 0600, and only then write the secret into it."""
    with sftp.open(path, "w"):
        pass
    sftp.chmod(path, 0o600)
    with sftp.open(path, "w") as f:
        f.write(content)


def _run(client: Any, command: str) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(command, timeout=600)
    out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def _check(client: Any, command: str) -> None:
    status, _, err = _run(client, command)
    if status != 0:
        last = err.strip().splitlines()[-1:]
        raise DeployError(last[0] if last else f"exit status {status}")

