"""Crash windows and fencing of the job system: each test hits one window deterministically.

Crash windows are hit with OSSIMPORT_CRASH_AT (ossimport/jobs/crashpoint.py): the master or the
console dies at a named step as if killed -9. Fencing is tested with two hand-driven workers (real
DEALER sockets speaking the protocol) against a real master process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import zmq
from helpers import write_tree
from jobenv import JobEnv
from test_jobs import local_keys

from ossimport.jobs.protocol import pack, unpack
from ossimport.jobs.store import decode_manifest


def _all_task_keys(env: JobEnv) -> list[str]:
    keys = []
    for state in ("pending_tasks", "dispatched", "succeed_tasks", "failed_tasks"):
        for t in env.task_dirs(state):
            keys.extend(e.key for e in decode_manifest((t / "TASK").read_text())[1])
    return keys


def _crash_start(env: JobEnv, point: str) -> None:
    """Start the master with a crash point armed and wait until it died there."""
    env.env["OSSIMPORT_CRASH_AT"] = point
    try:
        env.console("start", "--workers", "0")
        env.wait_for(lambda: not env.pids("master"), 60, f"the master to die at {point}")
    finally:
        del env.env["OSSIMPORT_CRASH_AT"]


def test_rescan_after_a_crash_goes_on_from_the_recorded_task(tmp_path: Path, envs: list[JobEnv]) -> None:
    """Issue 9.1: a task written just before a kill, a file of it deleted before the restart: the
    scan goes on after the task's recorded last key, so no key falls between two tasks."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {k: k.encode() for k in "abcde"})
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "taskObjectCountLimit": 3})
    envs.append(env)
    env.console("submit")
    _crash_start(env, "scan.task-written")
    assert sorted(_all_task_keys(env)) == ["a", "b", "c"], "killed after writing the first task"
    (src / "b").unlink()
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan to finish")
    assert sorted(_all_task_keys(env)) == ["a", "b", "c", "d", "e"], "every key in exactly one task"


def test_a_kill_inside_next_pass_does_not_reuse_the_old_ranges(tmp_path: Path, envs: list[JobEnv]) -> None:
    """Issue 9.2: killed after the new pass's checkpoint, before the old range files went: the
    next pass still scans (range files are numbered by pass)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"one.txt": b"1"})
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "isIncremental": True,
                            "incrementalModeInterval": 1})
    envs.append(env)
    env.console("submit")
    env.env["OSSIMPORT_CRASH_AT"] = "next-pass.checkpoint-written"
    env.console("start", "--workers", "1")
    env.wait_for(lambda: not env.pids("master"), 90, "the master to die inside next_pass")
    del env.env["OSSIMPORT_CRASH_AT"]
    assert (dst / "one.txt").read_bytes() == b"1"
    assert json.loads((env.job_dir / "checkpoints" / "scan.json").read_text())["pass"] == 2
    (src / "two.txt").write_bytes(b"2")
    env.console("start", "--workers", "1")
    env.wait_for(lambda: (dst / "two.txt").exists(), 90, "the second pass to copy the new file")
    assert (dst / "two.txt").read_bytes() == b"2"


def test_retry_killed_midway_can_be_run_again(tmp_path: Path, envs: list[JobEnv]) -> None:
    """Issue 9.3: `retry` killed between cutting a failed task's manifest and moving it back to
    pending: the next `retry` finishes the move, and the job completes with exact counts."""
    files = {f"f{i:02d}": bytes([i]) * (i + 1) for i in range(30)}
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "taskObjectCountLimit": 10})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan")
    gone = "f15"
    (src / gone).unlink()
    env.console("start", "--workers", "1")
    st = env.wait_state({"FAILED"}, timeout=120)
    assert st["Files Failed"] == 1
    (src / gone).write_bytes(files[gone])
    env.env["OSSIMPORT_CRASH_AT"] = "retry.manifest-cut"
    killed = env.console("retry", check=False)
    del env.env["OSSIMPORT_CRASH_AT"]
    assert killed.returncode == 137, killed.stderr
    again = env.console("retry")
    assert "1 failed tasks moved back to pending" in again.stdout
    st = env.wait_state({"SUCCEED"}, timeout=120)
    assert (st["Files Total"], st["Files Done"], st["Files Failed"]) == (30, 30, 0)
    assert (dst / gone).read_bytes() == files[gone]


class HandWorker:
    """A worker driven by the test: a real DEALER socket speaking the protocol."""

    def __init__(self, address: str, name: str, keys_dir: Path | None = None) -> None:
        self.name = name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys_dir is not None and (keys_dir / "worker.key_secret").exists():
            from ossimport.jobs.security import CurveClientKeys

            CurveClientKeys(keys_dir).apply(self.sock)
        self.sock.connect(address)

    def send(self, kind: str, **body: Any) -> None:
        self.sock.send(pack(kind, worker=self.name, **body))

    def ask(self, kind: str, want: set[str], timeout: float = 20.0, **body: Any) -> dict[str, Any]:
        """Send one message (again every second) until an answer of a type in `want` comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(kind, **body)
            if self.sock.poll(1000):
                msg = unpack(self.sock.recv())
                if msg["type"] in want:
                    return msg
        raise AssertionError(f"{self.name}: no {want} answer to {kind} in {timeout}s")

    def drain(self) -> None:
        while self.sock.poll(200):
            self.sock.recv()

    def close(self) -> None:
        self.sock.close()


def test_a_late_result_of_a_lapsed_lease_does_not_override_the_holder(tmp_path: Path, envs: list[JobEnv]) -> None:
    """Issue 9.4: A takes the task and stalls; its lease lapses; B takes it; A's late failure is
    ignored and B is not told to drop the task; B's result is the one recorded."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"k1": b"one", "k2": b"two"})
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst)},
                 {"leaseSeconds": 5, "heartbeatSeconds": 1})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan")
    address = f"tcp://127.0.0.1:{env.port}"
    keys_dir = env.workdir / "keys"
    a, b = HandWorker(address, "worker-a", keys_dir), HandWorker(address, "worker-b", keys_dir)
    try:
        task_a = a.ask("want", {"task"})
        # A goes silent; its lease lapses and B gets the same task under another lease
        task_b = b.ask("want", {"task"}, timeout=30)
        assert task_b["task"] == task_a["task"] and task_b["lease"] != task_a["lease"]
        stale = a.ask("result", {"ack"}, job=task_a["job"], task=task_a["task"], lease=task_a["lease"], ok=False,
                      done={"files": 0, "failed": 2}, audit=["FAILED\tk1\tstalled"], errors=["k1", "k2"])
        assert stale["task"] == task_a["task"]
        assert env.task_dirs("dispatched") and not env.task_dirs("failed_tasks"), "A's failure was ignored"
        b.drain()  # the idle answers to B's earlier wants
        b.send("beat", tasks=[task_b["task"]], leases={task_b["task"]: task_b["lease"]}, progress={})
        assert not b.sock.poll(1500), "the holder is not told to drop its task"
        b.ask("result", {"ack"}, job=task_b["job"], task=task_b["task"], lease=task_b["lease"], ok=True,
              done={"files": 2, "copied": 2, "failed": 0, "bytes": 6}, audit=["COPIED\tk1\t3", "COPIED\tk2\t3"],
              errors=[])
        st = env.wait_state({"SUCCEED", "FAILED"}, timeout=30)
        assert (st["JobState"], st["Files Done"], st["Files Failed"]) == ("SUCCEED", 2, 0)
    finally:
        a.close()
        b.close()


def test_a_new_holder_keeps_the_temp_files_of_a_writer_at_work(tmp_path: Path) -> None:
    """Issue 9.4: running a task removes the temp files that earlier holders left, never those of
    a writer still at work (written after this holder was given the task)."""
    from ossimport.address import parse_address
    from ossimport.jobs.execute import JobSpec, TaskRunner
    from ossimport.storage.base import Entry
    from ossimport.storage.local import temp_name

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"d/a.bin": b"a" * 10, "d/b.bin": b"b" * 10})
    (dst / "d").mkdir(parents=True)
    old, fresh = dst / "d" / temp_name("a.bin"), dst / "d" / temp_name("b.bin")
    old.write_bytes(b"left by a killed holder")
    fresh.write_bytes(b"another holder writing")
    received = time.time() - 5
    os.utime(old, (received - 60, received - 60))
    runner = TaskRunner(JobSpec("j", parse_address(str(src) + "/"), parse_address(str(dst) + "/"), threads=2))
    try:
        result = runner.run([Entry("d/a.bin", 10, 0), Entry("d/b.bin", 10, 0)], received=received)
    finally:
        runner.close()
    assert result.ok
    assert not old.exists(), "an earlier holder's temp file is removed"
    assert fresh.read_bytes() == b"another holder writing", "a writer at work keeps its temp file"


def test_clean_and_submit_while_a_worker_holds_a_task_of_the_old_job(tmp_path: Path, envs: list[JobEnv]) -> None:
    """Issue 14.1: seed 002's flow while the master runs: `clean`, change destPrefix, `submit`. A
    worker still holding a task of the cleaned job reports it done: the new job must not count it
    (its tasks are another submission's), and every file lands in the new destination."""
    files = {f"f{i:03d}": bytes([i % 251]) * 7 for i in range(60)}
    src, old_dst, new_dst = tmp_path / "src", tmp_path / "old", tmp_path / "new"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", old_dst), "taskObjectCountLimit": 20})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan")
    w = HandWorker(f"tcp://127.0.0.1:{env.port}", "worker-old", env.workdir / "keys")
    try:
        held = w.ask("want", {"task"})
        env.console("clean", env.job_name)
        cfg = env.conf / "local_job.cfg"
        cfg.write_text(cfg.read_text().replace(str(old_dst), str(new_dst)))
        env.console("submit")
        env.wait_for(lambda: not (env.workdir / "master" / "jobqueue" / env.job_name).exists(), 30,
                     "the master to take the new job")
        w.ask("result", {"ack"}, job=held["job"], task=held["task"], lease=held["lease"], ok=True,
              done={"files": 20, "copied": 20, "failed": 0, "bytes": 140}, audit=[], errors=[])
    finally:
        w.close()
    env.console("start", "--workers", "1")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    got = {p.name: p.read_bytes() for p in new_dst.rglob("*") if p.is_file()}
    assert got == files, f"{len(files) - len(got)} files missing in the new destination"
    assert (st["JobState"], st["Files Done"]) == ("SUCCEED", 60)
