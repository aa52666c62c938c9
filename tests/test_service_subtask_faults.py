"""Dataflow subtasks on the job system's workers, under faults: a worker that takes no subtasks,
workers killed or frozen mid-copy (with a cancel pending, another worker to finish, the master
restarting meanwhile), the service restarted while a worker copies. Real `ossimport serve`, master
and workers (processes), moto S3 behind a fault proxy, a local directory as the file system."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers.faultproxy import Fault, FaultProxy
from serviceenv import ServiceEnv
from test_service_dataflows import Flow, crc64, metric, proxied_flow

MiB = 1024 * 1024
FINAL = {"COMPLETE", "FAILED", "CANCELED"}


def console(env: ServiceEnv, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "ossimport", "console", "--sys", str(env.sys_path), *args],
                   check=True, capture_output=True, env=env.env, timeout=120)


def master_address(env: ServiceEnv) -> str:
    for line in env.sys_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("masterAddress="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no masterAddress in sys.properties")


def master_log(env: ServiceEnv) -> str:
    path = env.workdir / "logs" / "ossimport2.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


@dataclass
class Copying:
    """A StreamImport subtask of big.bin (`data`) whose first bytes arrived on a worker."""

    env: ServiceEnv
    flow: Flow
    proxy: FaultProxy
    task: str
    sub: str
    data: bytes

    def reads(self) -> int:
        """GETs of big.bin the object store served."""
        return sum(1 for r in self.proxy.records if r.method == "GET" and r.path.endswith("/big.bin"))

    def cancel(self) -> None:
        self.env.ok("CancelDataFlowSubTask", FileSystemId=str(self.flow.fs), DataFlowId=self.flow.flow_id,
                    DataFlowTaskId=self.task, DataFlowSubTaskId=self.sub)


@contextmanager
def copying_on_a_worker(backend_factory: Any, tmp_path: Path, data: bytes, *, bps: int, every_read: bool = False,
                        workers: int = 1) -> Iterator[Copying]:
    """The service with the master and `workers` workers (leaseSeconds 5), an object store that
    serves big.bin at `bps` (its first GET, or `every_read`), and a StreamImport subtask of it
    that a worker is copying; everything stopped afterwards."""
    env = ServiceEnv(tmp_path, {"workerCount": workers})
    env.start()
    try:
        env.wait(lambda: (metric(env, 'ossimport_workers{kind="connected"}') or 0) >= workers, 60, "the workers")
        with proxied_flow(env, backend_factory, tmp_path) as (flow, proxy):
            flow.put("test/big.bin", data)
            slow = {"probability": 1.0} if every_read else {"count": 1}
            proxy.add(Fault("slow_down", method="GET", path=r"big\.bin$", bps=bps, **slow))  # type: ignore[arg-type]
            task = flow.task("StreamImport")
            sub = flow.sub(task, "/big.bin", "/big.bin")
            env.wait(lambda: flow.describe(sub)["ProgressStats"]["BytesDone"] > 0, 60, "bytes to arrive")
            assert metric(env, 'ossimport_subtasks_started_total{runner="workers"}') == 1
            yield Copying(env, flow, proxy, task, sub, data)
    finally:
        env.stop()


def kill_master(env: ServiceEnv) -> None:
    os.kill(int((env.workdir / "run" / "master.pid").read_text()), signal.SIGKILL)


def worker_pids(env: ServiceEnv) -> list[int]:
    return [int(p.read_text()) for p in sorted((env.workdir / "run").glob("worker-*.pid"))]


def writing(pid: int, name: str) -> bool:
    """Whether process `pid` has a file open whose name contains `name` (its temporary file)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(name in os.readlink(fd) for fd in fds.iterdir())
    except OSError:
        return False


def test_a_worker_without_subtask_slots_leaves_subtasks_to_the_service(backend_factory: Any, tmp_path: Path) -> None:
    """`ossimport worker --subtask-slots 0` is connected but takes no subtask: the service must not
    hand them to the master (they would stay RUNNING forever), it copies them itself."""
    env = ServiceEnv(tmp_path, workers=False)
    worker = None
    try:
        console(env, "start", "--no-service", "--workers", "0")
        worker = subprocess.Popen(
            [sys.executable, "-m", "ossimport", "worker", "--master", master_address(env), "--workdir",
             str(tmp_path / "w0"), "--curve-keys", str(env.workdir / "keys"), "--heartbeat", "1",
             "--subtask-slots", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env.env)
        env.wait(lambda: "connected from" in master_log(env), 60, "the worker to say hello to the master")
        env.start()  # its first word from the master already counts that worker
        flow = Flow(env, backend_factory("s3-moto"), tmp_path)
        flow.put("test/a.txt", b"hello")
        sub = flow.sub(flow.task("StreamImport"), "/a.txt", "/a.txt")
        s = flow.wait(sub, FINAL, 30)
        assert s["Status"] == "COMPLETE", s
        assert (flow.fs / "oss" / "mnt" / "a.txt").read_bytes() == b"hello"
        assert metric(env, 'ossimport_subtasks_started_total{runner="service"}') == 1
    finally:
        if worker is not None:
            worker.kill()
            worker.wait(10)
        env.stop()


def test_a_cancel_sent_to_a_killed_worker_ends_canceled(backend_factory: Any, tmp_path: Path) -> None:
    """The worker copying a subtask is killed, and the subtask canceled before its lease lapses: the
    cancel reaches nobody, the master takes the subtask back at the lapse. It must end CANCELED, not
    stay CANCELING (which DeleteDataFlow and CancelDataFlowTask refuse, "cancel them first"), and
    what the killed worker left at the destination goes."""
    data = random.Random(21).randbytes(4 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=256 * 1024, every_read=True) as c:
        [pid] = worker_pids(c.env)
        os.kill(pid, signal.SIGKILL)
        c.cancel()
        s = c.flow.wait(c.sub, FINAL, 60)
        assert s["Status"] == "CANCELED", s
        assert os.listdir(c.flow.fs / "oss" / "mnt") == [], "no file and no temporary file of the killed worker"
        c.env.ok("CancelDataFlowTask", FileSystemId=str(c.flow.fs), DataFlowId=c.flow.flow_id, TaskId=c.task)
        c.env.ok("DeleteDataFlow", FileSystemId=str(c.flow.fs), DataFlowId=c.flow.flow_id)


def test_a_subtask_handed_to_another_worker_removes_the_killed_ones_temporary_file(
        backend_factory: Any, tmp_path: Path) -> None:
    """Two workers; the one copying a subtask is killed mid-copy, its lease lapses and the master
    hands the subtask to the other, which must remove what the first left at the destination."""
    data = random.Random(22).randbytes(4 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=256 * 1024, workers=2) as c:
        [holder] = c.env.wait(lambda: [p for p in worker_pids(c.env) if writing(p, ".big.bin.ossimport.")], 30,
                              "the worker writing big.bin")
        os.kill(holder, signal.SIGKILL)
        assert_complete(c)
        assert metric(c.env, 'ossimport_subtasks_started_total{runner="service"}') == 0, "finished by a worker"


def test_a_master_restarted_while_its_worker_is_silent_does_not_copy_the_subtask_twice(
        backend_factory: Any, tmp_path: Path) -> None:
    """The master is killed and restarted while the worker copying a subtask is frozen (SIGSTOP: a
    slow host, a network hiccup), so the service's resubmission reaches the new master before the
    worker's word. The master must neither give the subtask back to the service (no worker spoke
    yet: none known is not none there) nor make the worker drop the copy once it speaks again."""
    data = random.Random(23).randbytes(3 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=256 * 1024) as c:
        [frozen] = worker_pids(c.env)
        os.kill(frozen, signal.SIGSTOP)
        try:
            kill_master(c.env)
            console(c.env, "start", "--no-service")
            # the service polls the new master every second: three polls resubmit the subtask and
            # would give it back; an absence over a span can only be checked over that span
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                assert metric(c.env, 'ossimport_subtasks_started_total{runner="service"}') == 0, \
                    "the master gave the subtask back while its worker still copied it"
                time.sleep(0.2)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert_complete(c)
        assert c.reads() == 1, f"the source was read {c.reads()} times"
        assert metric(c.env, 'ossimport_subtasks_started_total{runner="service"}') == 0


def test_a_cancel_while_the_master_restarts_stops_the_workers_copy(backend_factory: Any, tmp_path: Path) -> None:
    """A subtask is canceled while the master is down and the worker copying it frozen: the new
    master knows nothing of it when the cancel arrives. The cancel must still win: CANCELED, and the
    worker, once it speaks again, drops the copy (no file at the destination, no temporary file)."""
    data = random.Random(24).randbytes(3 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=256 * 1024, every_read=True) as c:
        [frozen] = worker_pids(c.env)
        os.kill(frozen, signal.SIGSTOP)
        try:
            kill_master(c.env)
            c.cancel()
            console(c.env, "start", "--no-service")
            s = c.flow.wait(c.sub, FINAL, 30)
            assert s["Status"] == "CANCELED", s
        finally:
            os.kill(frozen, signal.SIGCONT)
        mnt = c.flow.fs / "oss" / "mnt"
        c.env.wait(lambda: os.listdir(mnt) == [], 60, "the worker to drop its copy and its temporary file")
        assert c.flow.describe(c.sub)["Status"] == "CANCELED"


def test_graceful_restarts_of_the_service_do_not_fail_a_subtask_its_worker_copies(
        backend_factory: Any, tmp_path: Path) -> None:
    """The service is stopped (SIGTERM) and started again three times while a worker copies a long
    subtask: no start was a failed one (the copy went on at the worker), so the subtask is not
    FAILED "started 3 times without finishing"; it completes, read once."""
    data = random.Random(25).randbytes(4 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=128 * 1024) as c:
        for _ in range(3):
            assert c.env.proc is not None
            c.env.proc.terminate()
            c.env.proc.wait(60)
            c.env.proc = None
            c.env.start()
            # the new service claims it from the master again (a start counted in its attempts)
            c.env.wait(lambda: metric(c.env, 'ossimport_subtasks_started_total{runner="workers"}') == 1, 30,
                       "the restarted service to claim the subtask")
        assert_complete(c)
        assert c.reads() == 1, f"the source was read {c.reads()} times"


def test_a_worker_host_without_the_file_system_fails_the_subtask_instead_of_writing_its_own_disk(
        tmp_path: Path) -> None:
    """A worker on a host where the dataflow's file system is not mounted: the import would create
    the path on that host's own disk and say COMPLETE. It fails, naming the path and the host."""

    from ossimport.address import parse_address
    from ossimport.engine.single import SingleRequest
    from ossimport.jobs.protocol import location_to_dict
    from ossimport.jobs.stream_worker import StreamSlots
    from ossimport.jobs.wakeup import Wakeup

    src_dir = tmp_path / "store"
    src_dir.mkdir()
    (src_dir / "a.txt").write_bytes(b"alpha")
    unmounted = tmp_path / "cpfs" / "oss"  # not on this "host"
    done = Wakeup()
    slots = StreamSlots(1, done=done)
    try:
        spec = {"src": location_to_dict(parse_address(f"{src_dir}/")),
                "dst": location_to_dict(parse_address(f"{unmounted}/"))}
        request = SingleRequest("a.txt", "a.txt", "OVERWRITE_EXISTING", "/a.txt").to_dict()
        assert slots.start({"id": "s1", "spec": spec, "request": request})
        deadline = time.monotonic() + 30
        results = slots.due()
        while not results and time.monotonic() < deadline:
            time.sleep(0.05)
            results = slots.due()
        [(sub_id, result)] = results
        assert sub_id == "s1" and result.status == "FAILED", result
        assert "FILE_SYSTEM_NOT_FOUND" in result.error and str(unmounted) in result.error
        assert not (tmp_path / "cpfs").exists(), "nothing was written on this host's disk"
    finally:
        slots.close()
        done.close()


def test_a_subtask_whose_file_system_directory_vanished_fails_with_the_reason(
        backend_factory: Any, tmp_path: Path) -> None:
    env = ServiceEnv(tmp_path, workers=False)
    env.start()
    try:
        flow = Flow(env, backend_factory("s3-moto"), tmp_path)
        flow.put("test/a.txt", b"alpha")
        task = flow.task("StreamImport")
        env.ok("StopDataFlow", FileSystemId=str(flow.fs), DataFlowId=flow.flow_id)
        sub = flow.sub(task, "/a.txt", "/a.txt")
        (flow.fs / "oss").rmdir()
        env.ok("StartDataFlow", FileSystemId=str(flow.fs), DataFlowId=flow.flow_id)
        s = flow.wait(sub, FINAL)
        assert s["Status"] == "FAILED" and "create it first" in s["ErrorMsg"], s
        assert "internal error" not in s["ErrorMsg"]
        assert not (flow.fs / "oss").exists()
    finally:
        env.stop()


def test_a_result_that_came_while_the_service_was_down_is_not_copied_again(
        backend_factory: Any, tmp_path: Path) -> None:
    """The service is killed while a worker copies; the copy ends while no service listens (the
    master's answer goes nowhere). The restarted service submits the subtask again and gets that
    answer: COMPLETE with its crc64, the source read once."""
    data = random.Random(26).randbytes(2 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=512 * 1024) as c:
        c.env.kill9()
        target = c.flow.fs / "oss" / "mnt" / "big.bin"
        c.env.wait(lambda: target.exists(), 60, "the worker to finish the copy")
        c.env.start()
        assert_complete(c)
        assert c.reads() == 1, f"the source was read {c.reads()} times"


def test_subtasks_on_a_worker_killed_mid_copy_are_finished_elsewhere(backend_factory: Any, tmp_path: Path) -> None:
    """A worker copying a subtask is killed: its lease lapses at the master and the subtask is
    handed on — here, with no worker left, back to the service, which finishes it."""
    data = random.Random(12).randbytes(4 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=256 * 1024) as c:
        [pid] = worker_pids(c.env)
        os.kill(pid, signal.SIGKILL)
        assert_complete(c)
        assert metric(c.env, 'ossimport_subtasks_started_total{runner="service"}') == 1
        assert metric(c.env, 'ossimport_workers{kind="connected"}') == 0


def test_a_master_killed_while_a_worker_copies_a_subtask_does_not_copy_it_twice(
        backend_factory: Any, tmp_path: Path) -> None:
    """The master forgets its subtasks when killed; the worker goes on, the restarted master adopts
    the copy from the worker's beats and the service claims it: one GET of the source, COMPLETE."""
    data = random.Random(13).randbytes(3 * MiB)
    with copying_on_a_worker(backend_factory, tmp_path, data, bps=256 * 1024) as c:
        kill_master(c.env)
        console(c.env, "start", "--no-service")
        assert_complete(c)
        assert c.reads() == 1, f"the source was read {c.reads()} times"
        assert metric(c.env, 'ossimport_subtasks_started_total{runner="service"}') == 0


def assert_complete(c: Copying) -> None:
    """The subtask ends COMPLETE with the crc64 of the data, which arrived whole and alone (no
    temporary file of a killed copy beside it)."""
    s = c.flow.wait(c.sub, FINAL, 120)
    assert s["Status"] == "COMPLETE", s
    assert s["FileDetail"]["Checksum"] == crc64(c.data)
    assert (c.flow.fs / "oss" / "mnt" / "big.bin").read_bytes() == c.data
    assert os.listdir(c.flow.fs / "oss" / "mnt") == ["big.bin"], "no temporary file is left"
