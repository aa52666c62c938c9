"""Workers on other hosts: a network namespace joined by a veth pair is the second host (its only
way to the master is the link); the master requires CURVE there and on loopback alike (a local
stranger gets nothing); and `console deploy` checks host keys, ships wheels, makes a venv and starts
a worker over SSH (a private sshd on 127.0.0.1 whose python3 has only the standard library)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
import zmq.auth
from backends import sftp as sftp_backend
from jobenv import JobEnv

from ossimport.errors import UsageError
from ossimport.jobs.deploy import HOST_NEEDS
from ossimport.jobs.master import Master
from ossimport.jobs.protocol import ProtocolError, pack, unpack
from ossimport.jobs.security import CurveClientKeys, is_loopback_endpoint
from ossimport.jobs.store import WorkDir
from ossimport.jobs.wheels import SOURCE_FILES, Target, wheels_for

ROOT = Path(__file__).resolve().parent.parent


# ---- helpers ------------------------------------------------------------------------------------------
def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class NetNS:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    def counter(self, which: str) -> int:
        """Bytes through the host end of the link (`tx_bytes` = towards the namespace)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/{which}").read_text())


def _taken_addresses() -> set[str]:
    out = ip("-o", "-4", "addr", "show").stdout
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out))


@pytest.fixture
def netns() -> Iterator[NetNS]:
    """A second host: namespace `ossiXXXXXX`, veth pair, host side 10.251.R.N+1/30, namespace side
    N+2/30. Removed on teardown, whatever happened."""
    tag = uuid.uuid4().hex[:6]
    name, host_if, ns_if = f"ossi{tag}", f"vo{tag}h", f"vo{tag}n"
    taken = _taken_addresses()
    rnd = random.Random()
    for _ in range(50):  # a /30 nobody on this machine uses yet
        third, base = rnd.randrange(256), rnd.randrange(64) * 4
        host_ip, ns_ip = f"10.251.{third}.{base + 1}", f"10.251.{third}.{base + 2}"
        if host_ip not in taken and ns_ip not in taken:
            break
    else:
        pytest.fail("no free 10.251.x.y/30 found")
    made = ip("netns", "add", name, check=False)
    if made.returncode != 0:
        pytest.skip(f"ip netns not permitted here: {made.stderr.strip()}")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("-n", name, "link", "set", ns_if, "up")
        ip("-n", name, "link", "set", "lo", "up")
        yield NetNS(name, host_if, host_ip, ns_ip)
    finally:
        ip("netns", "del", name, check=False)  # takes the namespace end of the veth, and so the pair
        if Path(f"/sys/class/net/{host_if}").exists():
            ip("link", "del", host_if, check=False)
        assert name not in ip("netns", "list").stdout
        assert not Path(f"/sys/class/net/{host_if}").exists()


def free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def small_tree(n: int, seed: int = 11) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {f"d{i % 7}/s{i % 3}/{'deep/' * (i % 2)}f{i:04d}.bin": rnd.randbytes(rnd.randint(0, 3000))
            for i in range(n)}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def local_job(src: Path, dst: Path, **extra: Any) -> dict[str, Any]:
    return {"srcType": "local", "srcPrefix": f"{src}/", "destType": "local", "destPrefix": f"{dst}/",
            "taskObjectCountLimit": 20, **extra}


def terminate(proc: subprocess.Popen[bytes] | psutil.Process) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for it."""
    try:
        proc.send_signal(signal.SIGTERM)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    try:
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=10)


class NsWorkers:
    """Workers started inside a namespace; all are stopped on teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, ns: NetNS, master: str, keys: Path, workdir: Path) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{workdir.name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-m", "ossimport", "worker", "--master", master,
                 "--curve-keys", str(keys), "--workdir", str(workdir), "--heartbeat", "1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            terminate(proc)


@pytest.fixture
def ns_workers(tmp_path: Path) -> Iterator[NsWorkers]:
    workers = NsWorkers(tmp_path)
    yield workers
    workers.stop()


def worker_id_prefix(pid: int) -> str:
    """Worker ids are `<hostname>-<pid>-<random>`; `ip netns exec` execs the command in place."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + 10
    # polled: read in the middle of the exec, a command line can be empty for a moment
    while "ossimport" not in " ".join(proc.cmdline()):
        kids = [c for c in proc.children(recursive=True) if "ossimport" in " ".join(c.cmdline())]
        if kids:  # in case some `ip` forks instead
            proc = kids[0]
            break
        assert time.monotonic() < deadline, f"no ossimport process at pid {pid}"
        time.sleep(0.05)
    return f"{socket.gethostname()}-{proc.pid}-"


def done_workers(env: JobEnv) -> list[str]:
    return [json.loads((t / "DONE").read_text())["worker"] for t in env.task_dirs("succeed_tasks")]


def assert_job_complete(env: JobEnv, files: dict[str, bytes], dst: Path, tasks: int) -> None:
    st = env.stat()
    assert st["JobState"] == "SUCCEED", (st, env.log_tail())
    assert (st["Succeed Task Count"], st["Failed Task Count"], st["Pending Task Count"],
            st["Dispatched Task Count"]) == (tasks, 0, 0, 0), st
    assert (st["Files Total"], st["Files Done"], st["Files Failed"]) == (len(files), len(files), 0), st
    assert st["Bytes Total"] == st["Bytes Done"] == sum(map(len, files.values())), st
    got = read_tree(dst)
    assert sorted(got) == sorted(files)
    assert all(got[k] == files[k] for k in files), [k for k in files if got[k] != files[k]][:5]
    keys = env.audit_keys()
    assert Counter(keys) == Counter(list(files)), "every file recorded exactly once in the audit"


# ---- a: a worker on a second host, over CURVE ----------------------------------------------------------
def test_worker_in_namespace_over_curve_and_a_stranger_gets_nothing(
        tmp_path: Path, netns: NetNS, envs: list[JobEnv], ns_workers: NsWorkers) -> None:
    files = small_tree(200)
    src, dst, keys = tmp_path / "src", tmp_path / "dst", tmp_path / "keys"
    write_tree(src, files)
    port = free_port_on(netns.host_ip)
    master = f"tcp://{netns.host_ip}:{port}"
    env = JobEnv(tmp_path / "job", local_job(src, dst), {"masterAddress": master, "curveKeysDir": str(keys)})
    envs.append(env)
    env.console("submit")
    out = env.console("start", "--workers", "0").stdout
    assert f"master started on {master}" in out
    assert (keys / "master.key_secret").exists() and (keys / "authorized" / "worker.key").exists()
    env.wait_for(lambda: env.stat()["Is Scan Finished"], timeout=20, what="the scan")
    assert env.stat()["Pending Task Count"] == 10

    # the master listens on the link's address only, not on loopback
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass

    # a worker with a key pair of its own (and the right master key) is refused at the handshake
    stranger_keys = tmp_path / "stranger-keys"
    stranger_keys.mkdir()
    zmq.auth.create_certificates(str(stranger_keys), "worker")
    shutil.copy(keys / "master.key", stranger_keys / "master.key")
    stranger = ns_workers.start(netns, master, stranger_keys, tmp_path / "stranger")
    rx_before = netns.counter("rx_bytes")
    deadline = time.monotonic() + 3.0
    polls = 0
    while time.monotonic() < deadline:  # bounded: 3 s of no progress while only the stranger runs
        st = env.stat()
        assert (st["Pending Task Count"], st["Dispatched Task Count"], st["Succeed Task Count"]) == (10, 0, 0), st
        assert not dst.exists() or not any(dst.iterdir())
        polls += 1
        time.sleep(0.2)
    assert polls >= 3
    assert stranger.poll() is None, "the stranger died instead of being refused"
    assert netns.counter("rx_bytes") > rx_before, "the stranger never reached the master over the link"
    stranger_id = worker_id_prefix(stranger.pid)
    assert stranger_id not in env.log_tail(1000), "the master heard the stranger"

    # the worker with the deployed pair gets the tasks, over the link only
    tx_before = netns.counter("tx_bytes")
    good = ns_workers.start(netns, master, keys, tmp_path / "nsworker")
    good_id = worker_id_prefix(good.pid)
    env.wait_state({"SUCCEED", "FAILED"}, timeout=40)
    assert_job_complete(env, files, dst, tasks=10)
    workers = done_workers(env)
    assert len(workers) == 10 and all(w.startswith(good_id) for w in workers), (good_id, workers)
    assert f"worker {workers[0]} connected" in env.log_tail(1000)
    # the manifests went master -> namespace through the veth (10 tasks x 20 entries)
    assert netns.counter("tx_bytes") - tx_before > 200 * 20
    assert good.poll() is None and stranger.poll() is None
    assert not list((tmp_path / "stranger").rglob("TASK"))
    # refused all along, the stranger still obeys SIGTERM (it must not hang in a send to nobody)
    stranger.send_signal(signal.SIGTERM)
    try:
        stranger.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("a worker the master refuses does not stop on SIGTERM")


# ---- b: beyond loopback, never without keys ------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:1", "tcp://localhost:1", "tcp://[::1]:1", "ipc://x",
                                      "tcp://127.9.9.9:13830", "inproc://x"])
def test_loopback_endpoints(endpoint: str) -> None:
    assert is_loopback_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", ["tcp://10.1.2.3:1", "tcp://0.0.0.0:1", "tcp://[::]:1", "tcp://*:1",
                                      "tcp://example.com:1", "tcp://192.168.1.5:13830", "tcp://[fe80::1]:1"])
def test_non_loopback_endpoints(endpoint: str) -> None:
    assert not is_loopback_endpoint(endpoint)


def test_master_beyond_loopback_refuses_to_start_without_keys(tmp_path: Path) -> None:
    m = Master(WorkDir(tmp_path / "w"), "tcp://10.1.2.3:1", lambda path: None, curve_keys=None)
    with pytest.raises(ProtocolError, match="CURVE"):
        m.run()
    # a keys directory without the master's pair is refused too, naming the missing file
    m = Master(WorkDir(tmp_path / "w"), "tcp://10.1.2.3:1", lambda path: None, curve_keys=tmp_path / "nokeys")
    with pytest.raises(UsageError, match="master.key_secret"):
        m.run()


# ---- b2: on loopback too, only workers with the keys --------------------------------------------------
def _dealer(address: str, keys: Path | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"stranger-{uuid.uuid4().hex[:6]}".encode())
    if keys is not None:
        CurveClientKeys(keys).apply(sock)
    sock.connect(address)
    return sock


def _send(sock: zmq.Socket, kind: str, **body: Any) -> None:
    try:
        sock.send(pack(kind, worker=sock.getsockopt(zmq.IDENTITY).decode(), **body), zmq.NOBLOCK)
    except zmq.Again:
        pass  # no connection to queue it on: the master hears nothing, which is what is asserted


def _answers(sock: zmq.Socket, seconds: float, until: str | None = None) -> list[dict[str, Any]]:
    """What the master says to `sock` within `seconds` (stops early at a message of type `until`)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            got.append(unpack(sock.recv()))
            if got[-1]["type"] == until:
                break
    return got


def test_loopback_master_gives_a_local_stranger_nothing_and_ignores_its_results(
        tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(200, seed=3)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path / "job", local_job(src, dst))
    envs.append(env)
    assert is_loopback_endpoint(f"tcp://127.0.0.1:{env.port}")
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], timeout=20, what="the scan")
    tasks = [t.name for t in env.task_dirs("pending_tasks")]
    assert len(tasks) == 10
    keys = env.workdir / "keys"  # curveKeysDir's default, made by `console start`
    assert keys.stat().st_mode & 0o777 == 0o700
    assert all((keys / f"{n}.key_secret").stat().st_mode & 0o777 == 0o600 for n in ("master", "worker"))

    # strangers: a local process without keys, and one with a pair of its own (and the master's public key)
    own_keys = tmp_path / "own-keys"
    own_keys.mkdir()
    zmq.auth.create_certificates(str(own_keys), "worker")
    shutil.copy(keys / "master.key", own_keys / "master.key")
    address = f"tcp://127.0.0.1:{env.port}"
    strangers = [_dealer(address, None), _dealer(address, own_keys)]
    try:
        for sock in strangers:
            _send(sock, "hello", host="stranger", pid=0)
            _send(sock, "want")
            for task in tasks:  # "done", for tasks that copied nothing
                _send(sock, "result", job=env.job_name, task=task, ok=True, done={"files": 20, "bytes": 0},
                      audit=[], errors=[])
        heard = [_answers(sock, 2.0) for sock in strangers]
        assert heard == [[], []], "a stranger was answered (a task carries the storage credentials)"
        st = env.stat()
        assert (st["Pending Task Count"], st["Dispatched Task Count"], st["Succeed Task Count"]) == (10, 0, 0), st
        assert not dst.exists() or not any(dst.iterdir())
        assert "stranger" not in env.log_tail(1000), "the master heard a stranger"

        # the same client with the worker keys is answered with a task, so the strangers were heard by no one
        control = _dealer(address, keys)
        try:
            _send(control, "want")
            answer = _answers(control, 10.0, until="task")
            assert answer and answer[-1]["type"] == "task", answer
            _send(control, "release", task=answer[-1]["task"])
        finally:
            control.close()
    finally:
        for sock in strangers:
            sock.close()

    # the local workers `console start` launches get the keys by themselves and do the job
    env.console("start", "--workers", "2")
    env.wait_state({"SUCCEED", "FAILED"}, timeout=60)
    assert_job_complete(env, files, dst, tasks=10)
    assert not any(w.startswith("stranger") for w in done_workers(env))


def test_a_worker_without_keys_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ossimport", "worker", "--master", "tcp://127.0.0.1:1",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--curve-keys" in lines[0], lines


# ---- c: console deploy over SSH ------------------------------------------------------------------------
SshdFactory = Any  # (*extra sshd_config lines) -> SSHD_Handle


@pytest.fixture
def sshd_factory(tmp_path: Path) -> Iterator[SshdFactory]:
    """Private sshds whose SFTP server logs every open, write and mode change to `<tmp>/sftp.log`."""
    started: list[sftp_backend.SSHD_Handle] = []

    def start(*extra: str) -> sftp_backend.SSHD_Handle:
        home = tmp_path / f"sshd{len(started)}"
        home.mkdir()
        wrapper = home / "sftp-server"
        wrapper.write_text(f"#!/bin/sh\nexec /usr/lib/openssh/sftp-server -e -l INFO 2>>{home / 'sftp.log'}\n")
        wrapper.chmod(0o755)
        started.append(sftp_backend.start(home, [f"Subsystem sftp {wrapper}", *extra]))
        return started[-1]

    yield start
    for handle in started:
        sftp_backend.stop(handle)


@pytest.fixture
def sshd(sshd_factory: SshdFactory) -> sftp_backend.SSHD_Handle:
    return sshd_factory()


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel cache for every deploy of the session: the dependencies are fetched or built once."""
    return tmp_path_factory.mktemp("deploy-wheels")


def deploy_env(tmp_path: Path, sshd: sftp_backend.SSHD_Handle, wheel_cache: Path,
               sys_overrides: dict[str, Any] | None = None) -> JobEnv:
    """A job system whose `deploy` targets `sshd` as 127.0.0.1, with a HOME of its own (known_hosts)."""
    (tmp_path / "home").mkdir()
    env = JobEnv(tmp_path / "job", local_job(tmp_path / "src", tmp_path / "dst"),
                 {"workerUserName": sshd.user, "privateKeyFile": str(sshd.client_key), "sshPort": sshd.port,
                  **(sys_overrides or {})},
                 env={"OSSIMPORT_DEPLOY_DIR": str(tmp_path / "remote"), "HOME": str(tmp_path / "home")})
    env.workdir.mkdir(parents=True)
    (env.workdir / "wheels").symlink_to(wheel_cache)
    (env.conf / "workers").write_text(f"# the second 'host'\n{sshd.user}@127.0.0.1:{sshd.port}\n")
    return env


def known_hosts_line(sshd: sftp_backend.SSHD_Handle) -> str:
    kind, key = (sshd.tmp / "host_ed25519.pub").read_text().split()[:2]
    return f"[127.0.0.1]:{sshd.port} {kind} {key}"


def sftp_events(sshd: sftp_backend.SSHD_Handle, path: Path) -> list[str]:
    """The SFTP server's log lines about `path`: open, `close ... written N`, `set ... mode M`."""
    log = (sshd.tmp / "sftp.log").read_text(errors="replace")
    return [line for line in log.splitlines() if f'"{path}"' in line]


def _deployed_worker(remote: Path) -> psutil.Process | None:
    try:
        proc = psutil.Process(int((remote / "worker.pid").read_text()))
        cmd = " ".join(proc.cmdline())
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    return proc if "ossimport" in cmd and "worker" in cmd and proc.cwd() == str(remote) else None


def _wait_deployed_worker(remote: Path, not_pid: int | None = None) -> psutil.Process:
    deadline = time.monotonic() + 10
    while True:
        worker = _deployed_worker(remote)
        if worker is not None and worker.pid != not_pid:
            return worker
        if time.monotonic() > deadline:
            log = remote / "worker.log"
            raise AssertionError(f"no deployed worker is running: {log.read_text(errors='replace') if log.exists() else ''}")
        time.sleep(0.1)


def assert_runs_from_venv(worker: psutil.Process, remote: Path, python: str) -> None:
    """The worker is the venv's Python running the wheel built from this tree (not this tree itself)."""
    assert worker.cmdline()[0] == str(remote / "venv" / "bin" / "python"), worker.cmdline()
    installed = remote / "venv" / "lib" / f"python{python}" / "site-packages" / "ossimport"
    assert (installed / "jobs" / "worker.py").read_bytes() == (ROOT / "ossimport" / "jobs" / "worker.py").read_bytes()
    assert sorted(p.name for p in (remote / "keys").iterdir()) == ["master.key", "worker.key", "worker.key_secret"]
    assert (remote / "keys").stat().st_mode & 0o777 == 0o700
    assert (remote / "keys" / "worker.key_secret").stat().st_mode & 0o777 == 0o600


def deploy_and_run_a_job(tmp_path: Path, env: JobEnv, python: str, trust: bool = True) -> psutil.Process:
    """Submit a 60-file job, deploy, wait for it to succeed through the deployed worker alone."""
    files = small_tree(60, seed=5)
    src, dst, remote = tmp_path / "src", tmp_path / "dst", tmp_path / "remote"
    write_tree(src, files)
    env.console("submit")
    env.console("start", "--workers", "0")
    out = env.console("deploy", *(["--trust-new-hosts"] if trust else []), timeout=300)
    assert "127.0.0.1: worker started" in out.stdout, out.stdout + out.stderr
    worker = _wait_deployed_worker(remote)
    assert_runs_from_venv(worker, remote, python)
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=60)
    assert st["JobState"] == "SUCCEED", (remote / "worker.log").read_text(errors="replace")
    assert_job_complete(env, files, dst, tasks=3)
    prefix = f"{socket.gethostname()}-{worker.pid}-"
    assert all(w.startswith(prefix) for w in done_workers(env)), (prefix, done_workers(env))
    return worker


def stop_deployed_worker(remote: Path) -> None:
    worker_left = _deployed_worker(remote)
    if worker_left is not None:
        terminate(worker_left)


@pytest.mark.parametrize("master_on", ["loopback", "link"])
def test_console_deploy_starts_a_worker_over_ssh(tmp_path: Path, sshd: sftp_backend.SSHD_Handle,
                                                 wheel_cache: Path, envs: list[JobEnv],
                                                 request: pytest.FixtureRequest, master_on: str) -> None:
    """`loopback`: a master on 127.0.0.1 (the 'remote' host is this one). `link`: the master on a veth
    address. Either way the worker must use the keys deploy uploaded, and it runs in a venv made from
    the shipped wheels: the host's python3 needs none of ossimport's dependencies."""
    overrides: dict[str, Any] = {}
    if master_on == "link":
        ns: NetNS = request.getfixturevalue("netns")
        overrides = {"masterAddress": f"tcp://{ns.host_ip}:{free_port_on(ns.host_ip)}",
                     "curveKeysDir": str(tmp_path / "keys")}
    env = deploy_env(tmp_path, sshd, wheel_cache, overrides)
    envs.append(env)
    remote = tmp_path / "remote"
    try:
        worker = deploy_and_run_a_job(tmp_path, env, "3.11")
        # --trust-new-hosts recorded the host's key, in the format ssh itself reads
        assert (tmp_path / "home" / ".ssh" / "known_hosts").read_text().splitlines() == [known_hosts_line(sshd)]
        # the secret was made 0600 while still empty, before a byte of it was written
        events = sftp_events(sshd, remote / "keys" / "worker.key_secret")
        first_write = next(i for i, e in enumerate(events) if e.startswith("close") and not e.endswith("written 0"))
        assert any(e.startswith("set") and e.endswith("mode 0600") for e in events[:first_write]), events
        if master_on == "loopback":  # deploying again (the host now known) replaces the worker and its venv
            (remote / "venv" / "stale").write_text("from the last deploy")
            out = env.console("deploy", timeout=300)
            assert out.stdout.splitlines() == ["127.0.0.1: worker started"], out.stdout + out.stderr
            assert _wait_deployed_worker(remote, not_pid=worker.pid).pid != worker.pid
            worker.wait(timeout=10)
            assert not (remote / "venv" / "stale").exists()
    finally:
        stop_deployed_worker(remote)


def test_deploy_refuses_an_unknown_host_key_and_a_changed_one(tmp_path: Path, sshd: sftp_backend.SSHD_Handle,
                                                              wheel_cache: Path) -> None:
    env = deploy_env(tmp_path, sshd, wheel_cache)
    known_hosts = tmp_path / "home" / ".ssh" / "known_hosts"
    out = env.console("deploy", check=False, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        f"127.0.0.1: deploy failed: the host key of [127.0.0.1]:{sshd.port} (ssh-ed25519 "
        f"{ssh_fingerprint(sshd.tmp / 'host_ed25519.pub')}) is not in {known_hosts}: check the fingerprint, then "
        "run 'console.sh deploy --trust-new-hosts' to record it"], out.stdout
    assert out.stderr == ""
    assert not (tmp_path / "remote").exists() and not known_hosts.exists()

    # a recorded key that is not the host's: refused, --trust-new-hosts or not, and the record kept
    other = sftp_backend.keygen(tmp_path / "other_ed25519").with_suffix(".pub").read_text().split()
    known_hosts.parent.mkdir()
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    before = known_hosts.read_bytes()
    out = env.console("deploy", "--trust-new-hosts", check=False, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"127.0.0.1: deploy failed: the host key of [127.0.0.1]:{sshd.port}")
    assert "differs" in lines[0] and f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in lines[0], lines
    assert known_hosts.read_bytes() == before and not (tmp_path / "remote").exists()


def ssh_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


def test_deploy_names_the_one_thing_a_host_needs(tmp_path: Path, sshd_factory: SshdFactory,
                                                 wheel_cache: Path) -> None:
    """A python3 without ensurepip, as Debian's is without python3-venv."""
    fake = tmp_path / "no-venv"
    (fake / "ensurepip").mkdir(parents=True)
    (fake / "ensurepip" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    sshd = sshd_factory(f"SetEnv PYTHONPATH={fake}")
    env = deploy_env(tmp_path, sshd, wheel_cache)
    out = env.console("deploy", "--trust-new-hosts", check=False, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == f"127.0.0.1: deploy failed: {HOST_NEEDS}"
    assert HOST_NEEDS in (ROOT / "README.md").read_text().replace("\n", " ")
    assert not (tmp_path / "remote" / "venv").exists()


def test_deploy_to_a_host_with_another_python(tmp_path: Path, sshd_factory: SshdFactory, wheel_cache: Path,
                                              envs: list[JobEnv]) -> None:
    """The host's python3 is 3.12, this one's 3.11: binary wheels are fetched for cp312 (a source
    package with no wheel is built on the host) and the worker runs."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the deploying side runs Python {sys.version_info[0]}.{sys.version_info[1]}, not 3.11")
    sshd = sshd_factory("SetEnv PYENV_VERSION=3.12.1")  # the test machine's python3 is a pyenv shim
    probe = subprocess.run(["ssh", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path / 'probe_kh'}",
                            f"{sshd.user}@127.0.0.1", "python3 -c 'import sys; print(sys.version_info[:2])'"],
                           capture_output=True, text=True, timeout=30)
    if probe.stdout.strip() != "(3, 12)":
        pytest.skip(f"no Python 3.12 python3 for the sshd session (pyenv 3.12.1): {probe.stdout}{probe.stderr}")
    env = deploy_env(tmp_path, sshd, wheel_cache)
    envs.append(env)
    try:
        deploy_and_run_a_job(tmp_path, env, "3.12")
        shipped = [p.name for p in (tmp_path / "remote" / "wheels").iterdir()]
        assert any(n.startswith("pyzmq-") and "-cp312-" in n for n in shipped), shipped
    finally:
        stop_deployed_worker(tmp_path / "remote")


def test_deploy_reports_a_host_it_cannot_reach(tmp_path: Path, sshd: sftp_backend.SSHD_Handle,
                                               wheel_cache: Path) -> None:
    env = deploy_env(tmp_path, sshd, wheel_cache)
    closed = free_port_on("127.0.0.1")
    (env.conf / "workers").write_text(f"127.0.0.1:{closed}\nnobody@127.0.0.1:{sshd.port}\n")
    out = env.console("deploy", "--trust-new-hosts", check=False, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if "recorded in" not in line]
    assert len(lines) == 2 and all(line.startswith("127.0.0.1: deploy failed: ") for line in lines), lines
    assert "Authentication failed" in lines[1], lines
    assert not (tmp_path / "remote").exists()


def test_a_later_deploy_of_changed_code_needs_no_index(tmp_path: Path, wheel_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the cache holds the dependencies, changed ossimport code is built and the set for
    another Python is completed with pip and no index at all (worker hosts and the deploying
    machine may both be offline)."""
    here = Target.here()
    other = Target((3, 12) if here.python != (3, 12) else (3, 13), here.implementation, here.platform, here.libc)
    cache = tmp_path / "wheels"
    shutil.copytree(wheel_cache, cache)
    for target in (here, other):  # the index allowed: whatever this session has not fetched yet
        wheels_for(cache, target)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    marker = f"# changed {uuid.uuid4().hex}\n"
    with open(src / "ossimport" / "__init__.py", "a") as f:
        f.write(marker)
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no config file's index or links either
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port_on('127.0.0.1')}/simple")  # nobody there
    for target in (here, other):
        files = wheels_for(cache, target, root=src)
        assert all(f.is_relative_to(cache) and f.exists() for f in files), files
        own = [f for f in files if f.name.startswith("ossimport-")]
        assert len(own) == 1
        with zipfile.ZipFile(own[0]) as whl:
            assert whl.read("ossimport/__init__.py").decode().endswith(marker)
    assert any(f.name.startswith("pyzmq-") and f"-{other.abi}-" in f.name for f in files), files
