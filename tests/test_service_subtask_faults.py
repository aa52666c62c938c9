"""Dataflow subtasks on the job system's workers, under faults: workers that take no subtasks,
workers killed mid-copy with a cancel pending or another worker to finish. Real `ossimport serve`,
master and workers (processes), moto S3 behind a fault proxy, a local directory as the file system."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from serviceenv import ServiceEnv
from test_service_dataflows import Flow, metric

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
