"""Streaming dataflows over the JSON door: a real `ossimport serve`, moto S3 as the object store,
a local directory as the file system; subtasks move real bytes through the engine."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import crcmod
import pytest
from servers.faultproxy import Fault, FaultProxy
from serviceenv import ServiceEnv

MiB = 1024 * 1024
_crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)
SECRET = "SECRET/TEST5678"


def crc64(data: bytes) -> str:
    return f"crc64:{_crc64(data)}"


class Flow:
    """One service, one file system directory and one S3 prefix, with helpers for the calls."""

    def __init__(self, svc: ServiceEnv, s3: Any, tmp: Path, address: str | None = None) -> None:
        self.svc = svc
        self.s3 = s3
        self.root = s3.new_root()
        self.fs = tmp / "fs"
        (self.fs / "oss").mkdir(parents=True, exist_ok=True)
        self.bucket = s3.storage(self.root)
        self.address = address or s3.address(self.root).rsplit("/", 2)[0]  # s3://AK:SK@bucket.host:port
        self.flow_id = svc.ok("CreateDataFlow", FileSystemId=str(self.fs), SourceStorage=self.address,
                              FileSystemPath="/oss/", SourceStoragePath=f"/{self.root}/")["DataFlowId"]

    def task(self, action: str, directory: str = "/test/", dst: str = "/mnt/", policy: str = "OVERWRITE_EXISTING") -> str:
        return self.svc.ok("CreateDataFlowTask", FileSystemId=str(self.fs), DataFlowId=self.flow_id, TaskAction=action,
                           DataType="MetaAndData", Directory=directory, DstDirectory=dst,
                           ConflictPolicy=policy)["TaskId"]

    def sub(self, task: str, src: str, dst: str, **extra: Any) -> str:
        return self.svc.ok("CreateDataFlowSubTask", FileSystemId=str(self.fs), DataFlowId=self.flow_id,
                           DataFlowTaskId=task, SrcFilePath=src, DstFilePath=dst, **extra)["DataFlowSubTaskId"]

    def describe(self, sub_id: str) -> dict[str, Any]:
        body = self.svc.ok("DescribeDataFlowSubTasks", FileSystemId=str(self.fs),
                           Filters=[{"Key": "DataFlowSubTaskIds", "Value": sub_id}])
        items = body["DataFlowSubTask"]["DataFlowSubTask"]
        assert len(items) == 1
        return items[0]

    def wait(self, sub_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        return self.svc.wait(lambda: (lambda s: s if s["Status"] in states else None)(self.describe(sub_id)),
                             timeout, f"subtask {sub_id} to reach {states}")

    def put(self, key: str, data: bytes) -> None:
        self.bucket.put(key, io.BytesIO(data), len(data))

    def get(self, key: str) -> bytes:
        with self.bucket.open(key) as f:
            return f.read()


def metric(svc: ServiceEnv, line: str) -> float | None:
    """The value of one /metrics sample, e.g. 'ossimport_workers{kind="connected"}'."""
    status, raw, _ = svc.request("GET", "/metrics")
    assert status == 200
    for text in raw.decode().splitlines():
        if text.startswith(line + " "):
            return float(text.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def svc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceEnv]:
    """The service alone (subtasks copy in its process), or with the job master and a worker
    (param "workers": subtasks go to the worker)."""
    on_workers = getattr(request, "param", "service") == "workers"
    env = ServiceEnv(tmp_path, workers=on_workers)
    env.start()
    try:
        if on_workers:
            env.wait(lambda: (metric(env, 'ossimport_workers{kind="connected"}') or 0) >= 1, 60,
                     "the worker to connect to the master")
        yield env
        if on_workers:  # every subtask of the test ran on the worker, none in the service
            assert metric(env, 'ossimport_subtasks_started_total{runner="service"}') == 0
            assert (metric(env, 'ossimport_subtasks_started_total{runner="workers"}') or 0) >= 1
    finally:
        env.stop()


BOTH = pytest.mark.parametrize("svc", ["service", "workers"], indirect=True)


@pytest.fixture
def flow(svc: ServiceEnv, backend_factory: Any, tmp_path: Path) -> Flow:
    return Flow(svc, backend_factory("s3-moto"), tmp_path)


@BOTH
def test_stream_import_and_export_50mib_report_progress_and_the_crc64_of_what_arrived(flow: Flow) -> None:
    data = random.Random(5).randbytes(50 * MiB)
    flow.put("test/big.bin", data)
    importing = flow.task("StreamImport")
    sub = flow.sub(importing, "/big.bin", "/mnt/big.bin")
    s = flow.wait(sub, {"COMPLETE", "FAILED"}, 180)
    assert s["Status"] == "COMPLETE", s
    assert s["Progress"] == 10000
    arrived = (flow.fs / "oss" / "mnt" / "big.bin").read_bytes()
    assert arrived == data
    assert s["FileDetail"]["Checksum"] == crc64(arrived) and s["FileDetail"]["Size"] == len(data)
    assert s["ProgressStats"]["BytesTotal"] == s["ProgressStats"]["BytesDone"] == len(data)
    assert s["ProgressStats"]["ActualBytes"] == len(data)
    assert s["SrcFilePath"] == f"/{flow.root}/test/big.bin" and s["DstFilePath"] == "/oss/mnt/big.bin"

    (flow.fs / "oss" / "yaml" / "test").mkdir(parents=True)
    out = random.Random(6).randbytes(50 * MiB)
    (flow.fs / "oss" / "yaml" / "test" / "file.png").write_bytes(out)
    exporting = flow.task("StreamExport", "/yaml/", "/dataflows/")
    sub = flow.sub(exporting, "/test/file.png", "/mnt/file.png")
    s = flow.wait(sub, {"COMPLETE", "FAILED"}, 180)
    assert s["Status"] == "COMPLETE", s
    assert flow.get("dataflows/mnt/file.png") == out
    assert s["Progress"] == 10000 and s["FileDetail"]["Checksum"] == crc64(out)
    assert s["DstFilePath"] == f"/{flow.root}/dataflows/mnt/file.png"


@BOTH
def test_condition_is_checked_against_the_source_before_copying(flow: Flow) -> None:
    (flow.fs / "oss" / "src").mkdir()
    f = flow.fs / "oss" / "src" / "a.txt"
    f.write_bytes(b"x" * 68)
    os.utime(f, (1725897600, 1725897600))
    task = flow.task("StreamExport", "/src/", "/out/")
    bad = flow.sub(task, "/a.txt", "/a.txt", Condition={"Size": 67, "ModifyTime": 1725897600000000000})
    s = flow.wait(bad, {"COMPLETE", "FAILED"})
    assert s["Status"] == "FAILED" and "CONDITION_NOT_MET" in s["ErrorMsg"] and "67" in s["ErrorMsg"]
    assert not list(flow.bucket.list())
    stale = flow.sub(task, "/a.txt", "/a.txt", Condition={"Size": 68, "ModifyTime": 1725897000000000000})
    assert flow.wait(stale, {"COMPLETE", "FAILED"})["Status"] == "FAILED"
    good = flow.sub(task, "/a.txt", "/a.txt", Condition={"Size": 68, "ModifyTime": 1725897600000000000})
    s = flow.wait(good, {"COMPLETE", "FAILED"})
    assert s["Status"] == "COMPLETE" and s["FileDetail"]["ModifyTime"] == 1725897600000000000
    assert flow.get("out/a.txt") == b"x" * 68


@BOTH
def test_conflict_policies(flow: Flow) -> None:
    flow.put("test/a.txt", b"new content")
    (flow.fs / "oss" / "mnt").mkdir()
    target = flow.fs / "oss" / "mnt" / "a.txt"
    target.write_bytes(b"old")
    skip = flow.task("StreamImport", policy="SKIP_THE_FILE")
    s = flow.wait(flow.sub(skip, "/a.txt", "/a.txt"), {"COMPLETE", "FAILED"})
    assert s["Status"] == "COMPLETE" and target.read_bytes() == b"old"
    latest = flow.task("StreamImport", policy="KEEP_LATEST")
    os.utime(target, (4102444800, 4102444800))  # newer than the object: kept
    flow.wait(flow.sub(latest, "/a.txt", "/a.txt"), {"COMPLETE"})
    assert target.read_bytes() == b"old"
    overwrite = flow.task("StreamImport", policy="OVERWRITE_EXISTING")
    flow.wait(flow.sub(overwrite, "/a.txt", "/a.txt"), {"COMPLETE"})
    assert target.read_bytes() == b"new content"


def test_missing_source_fails_with_a_reason(flow: Flow) -> None:
    task = flow.task("StreamImport")
    s = flow.wait(flow.sub(task, "/nope.bin", "/nope.bin"), {"COMPLETE", "FAILED"})
    assert s["Status"] == "FAILED" and "SOURCE_NOT_FOUND" in s["ErrorMsg"]
    status, raw, _ = flow.svc.request("GET", "/metrics")
    assert status == 200 and 'ossimport_subtasks{status="FAILED"} 1.0' in raw.decode()


def test_bad_input_answers_the_documented_codes(flow: Flow) -> None:
    svc, fs = flow.svc, str(flow.fs)
    task = flow.task("StreamImport")
    base = {"FileSystemId": fs, "DataFlowId": flow.flow_id, "DataFlowTaskId": task}
    cases = [
        ({**base, "SrcFilePath": "/../etc/passwd", "DstFilePath": "/x"}, 400, "IllegalCharacters"),
        ({**base, "SrcFilePath": "/a\x00b", "DstFilePath": "/x"}, 400, "IllegalCharacters"),
        ({**base, "SrcFilePath": "/dir/", "DstFilePath": "/x"}, 400, "InvalidParameter"),
        ({**base, "SrcFilePath": "a", "DstFilePath": "/x"}, 400, "InvalidParameter"),
        ({**base, "SrcFilePath": "/" + "a" * 1100, "DstFilePath": "/x"}, 400, "InvalidParameter"),
        ({**base, "SrcFilePath": "/a", "DstFilePath": "/x", "Condition": {"Size": "big"}}, 400, "InvalidParameter"),
        ({k: v for k, v in base.items() if k != "FileSystemId"} | {"SrcFilePath": "/a", "DstFilePath": "/b"},
         400, "MissingFileSystemId"),
        ({k: v for k, v in base.items() if k != "DataFlowId"} | {"SrcFilePath": "/a", "DstFilePath": "/b"},
         400, "MissingDataFlowId"),
        ({k: v for k, v in base.items() if k != "DataFlowTaskId"} | {"SrcFilePath": "/a", "DstFilePath": "/b"},
         400, "MissingTaskId"),
        ({**base, "DataFlowId": "df-nope", "SrcFilePath": "/a", "DstFilePath": "/b"}, 404, "InvalidDataFlow.NotFound"),
        ({**base, "DataFlowTaskId": "task-nope", "SrcFilePath": "/a", "DstFilePath": "/b"}, 404, "InvalidTask.NotFound"),
    ]
    for params, status, code in cases:
        got, body = svc.call("CreateDataFlowSubTask", **params)
        assert (got, body["Code"]) == (status, code), (params, body)
    for directory in ("/a/../b/", "test/", "/test"):
        got, body = svc.call("CreateDataFlowTask", FileSystemId=fs, DataFlowId=flow.flow_id, TaskAction="StreamImport",
                             Directory=directory, DstDirectory="/x/")
        assert got == 400 and body["Code"] in ("IllegalCharacters", "InvalidParameter"), body
    got, body = svc.call("CreateDataFlowTask", FileSystemId=fs, DataFlowId=flow.flow_id, TaskAction="StreamImport",
                         ConflictPolicy="NEWEST")
    assert got == 400 and "OVERWRITE_EXISTING" in body["Message"]
    got, body = svc.call("CreateDataFlow", FileSystemId="fs-undeclared", SourceStorage=flow.address)
    assert (got, body["Code"]) == (404, "InvalidFileSystem.NotFound")
    got, body = svc.call("CreateDataFlow", FileSystemId=fs, SourceStorage="/local/dir")
    assert (got, body["Code"]) == (400, "InvalidParameter")
    got, body = svc.call("DescribeDataFlowSubTasks", FileSystemId=fs, MaxResults=10)
    assert got == 400 and "20 to 100" in body["Message"]


def test_client_token_dry_run_and_paging(flow: Flow) -> None:
    flow.put("test/a.txt", b"a")
    task = flow.task("StreamImport")
    body = flow.svc.ok("CreateDataFlowSubTask", FileSystemId=str(flow.fs), DataFlowId=flow.flow_id,
                       DataFlowTaskId=task, SrcFilePath="/a.txt", DstFilePath="/a.txt", DryRun=True)
    assert body["DataFlowSubTaskId"] == ""
    first = flow.sub(task, "/a.txt", "/a.txt", ClientToken="same-token")
    again = flow.sub(task, "/a.txt", "/a.txt", ClientToken="same-token")
    assert first == again
    # the service killed after recording the subtask, before recording the token's answer: the
    # client's retry must still not create a second subtask
    import sqlite3

    with sqlite3.connect(flow.svc.workdir / "service" / "service.db") as db:
        assert db.execute("DELETE FROM tokens WHERE token = 'same-token'").rowcount == 1
    assert flow.sub(task, "/a.txt", "/a.txt", ClientToken="same-token") == first
    flow.wait(first, {"COMPLETE"})
    for i in range(24):
        flow.sub(task, "/a.txt", f"/copy{i}.txt")
    ids: list[str] = []
    token = ""
    for _ in range(5):
        page = flow.svc.ok("DescribeDataFlowSubTasks", FileSystemId=str(flow.fs), MaxResults=20, NextToken=token,
                           Filters=[{"Key": "DataFlowTaskIds", "Value": task}])
        ids += [s["DataFlowSubTaskId"] for s in page["DataFlowSubTask"]["DataFlowSubTask"]]
        token = page["NextToken"]
        if not token:
            break
    assert len(ids) == 25 == len(set(ids)) and ids[0] == first


def test_secrets_are_write_only(flow: Flow) -> None:
    flows = flow.svc.ok("DescribeDataFlows", FileSystemId=str(flow.fs))["DataFlowInfo"]["DataFlow"]
    assert len(flows) == 1 and flows[0]["Status"] == "Running"
    shown = flows[0]["SourceStorage"]
    assert SECRET not in json.dumps(flows) and "AKIDTEST1234" not in shown and shown.startswith("s3://")
    tasks = flow.svc.ok("DescribeDataFlowTasks", FileSystemId=str(flow.fs))
    assert SECRET not in json.dumps(tasks)
    db = flow.svc.workdir / "service" / "service.db"
    assert os.stat(db).st_mode & 0o077 == 0, "the database holds credentials: owner only"


def test_stop_start_delete_and_cancel_rules(flow: Flow) -> None:
    svc, fs = flow.svc, str(flow.fs)
    flow.put("test/a.txt", b"abc")
    task = flow.task("StreamImport")
    svc.ok("StopDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
    waiting = flow.sub(task, "/a.txt", "/a.txt")
    assert flow.describe(waiting)["Status"] == "CREATED"
    got, body = svc.call("DeleteDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
    assert (got, body["Code"]) == (400, "InvalidStatus.ResourceMismatch")
    svc.ok("StartDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
    assert flow.wait(waiting, {"COMPLETE"})["Progress"] == 10000
    got, body = svc.call("CancelDataFlowSubTask", FileSystemId=fs, DataFlowId=flow.flow_id, DataFlowTaskId=task,
                         DataFlowSubTaskId=waiting)
    assert (got, body["Code"]) == (400, "InvalidStatus.ResourceMismatch")
    svc.ok("StopDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
    queued = flow.sub(task, "/a.txt", "/b.txt")
    svc.ok("CancelDataFlowSubTask", FileSystemId=fs, DataFlowId=flow.flow_id, DataFlowTaskId=task,
           DataFlowSubTaskId=queued)
    assert flow.describe(queued)["Status"] == "CANCELED"
    svc.ok("CancelDataFlowTask", FileSystemId=fs, DataFlowId=flow.flow_id, TaskId=task)
    listed = svc.ok("DescribeDataFlowTasks", FileSystemId=fs)["TaskInfo"]["Task"]
    assert [t["Status"] for t in listed] == ["Canceled"]
    svc.ok("DeleteDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
    assert svc.ok("DescribeDataFlows", FileSystemId=fs)["DataFlowInfo"]["DataFlow"] == []


@contextmanager
def proxied_flow(svc: ServiceEnv, backend_factory: Any, tmp_path: Path) -> Iterator[tuple[Flow, FaultProxy]]:
    """A dataflow whose object store (moto) is reached through a fault proxy, to shape its answers."""
    s3 = backend_factory("s3-moto")
    with FaultProxy("127.0.0.1", s3.handle.port) as proxy:
        address = f"s3://AKIDTEST1234:SECRET%2FTEST5678@{s3.handle.bucket}.127.0.0.1:{proxy.port}"
        yield Flow(svc, s3, tmp_path, address), proxy


@pytest.fixture
def slow_flow(svc: ServiceEnv, backend_factory: Any, tmp_path: Path) -> Iterator[tuple[Flow, FaultProxy]]:
    """A dataflow whose object store is behind a fault proxy (each test slows what it needs)."""
    with proxied_flow(svc, backend_factory, tmp_path) as pair:
        yield pair


@BOTH
def test_cancel_of_a_running_subtask_leaves_no_partial_file(slow_flow: tuple[Flow, FaultProxy]) -> None:
    flow, proxy = slow_flow
    data = random.Random(7).randbytes(6 * MiB)
    flow.put("test/big.bin", data)
    proxy.add(Fault("slow_down", probability=1.0, method="GET", path=r"big\.bin$", bps=1 * MiB))
    task = flow.task("StreamImport")
    sub = flow.sub(task, "/big.bin", "/big.bin")
    running = flow.svc.wait(lambda: (lambda s: s if s["ProgressStats"]["BytesDone"] > 0 else None)(
        flow.describe(sub)), 60, "bytes to arrive")
    # Progress moves during the copy: the bytes that arrived so far, in 1/10000 of the size
    assert running["Status"] == "RUNNING" and 0 < running["Progress"] < 10000, running
    assert running["Progress"] == running["ProgressStats"]["BytesDone"] * 10000 // len(data)
    flow.svc.ok("CancelDataFlowSubTask", FileSystemId=str(flow.fs), DataFlowId=flow.flow_id, DataFlowTaskId=task,
                DataFlowSubTaskId=sub)
    s = flow.wait(sub, {"CANCELED", "COMPLETE", "FAILED"})
    assert s["Status"] == "CANCELED", s
    mnt = flow.fs / "oss" / "mnt"
    assert not mnt.exists() or os.listdir(mnt) == [], "no file and no temporary file is left"


@BOTH
def test_a_subtask_running_when_the_service_is_killed_is_resumed_on_restart(
        slow_flow: tuple[Flow, FaultProxy]) -> None:
    flow, proxy = slow_flow
    data = random.Random(8).randbytes(4 * MiB)
    flow.put("test/big.bin", data)
    proxy.add(Fault("slow_down", count=1, method="GET", path=r"big\.bin$", bps=512 * 1024))
    task = flow.task("StreamImport")
    sub = flow.sub(task, "/big.bin", "/big.bin")
    flow.svc.wait(lambda: flow.describe(sub)["ProgressStats"]["BytesDone"] > 0, 60, "bytes to arrive")
    flow.svc.kill9()
    flow.svc.start()
    s = flow.wait(sub, {"COMPLETE", "FAILED"})
    assert s["Status"] == "COMPLETE" and s["FileDetail"]["Checksum"] == crc64(data)
    assert (flow.fs / "oss" / "mnt" / "big.bin").read_bytes() == data
    assert os.listdir(flow.fs / "oss" / "mnt") == ["big.bin"], "the killed run's temporary file is gone"


def test_file_system_ids_declared_in_conf_filesystems(svc: ServiceEnv, backend_factory: Any, tmp_path: Path) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    mount = tmp_path / "cpfs"
    (mount / "oss").mkdir(parents=True)
    (svc.conf / "filesystems").write_text(f"# test\nbmcpfs-370jz26fkr2st9 = {mount}\n", encoding="utf-8")
    address = s3.address(root).rsplit("/", 2)[0]
    flow_id = svc.ok("CreateDataFlow", FileSystemId="bmcpfs-370jz26fkr2st9", SourceStorage=address,
                     FileSystemPath="/oss/", SourceStoragePath=f"/{root}/")["DataFlowId"]
    bucket = s3.storage(root)
    bucket.put("test/file.xml", io.BytesIO(b"<xml/>"), 6)
    task = svc.ok("CreateDataFlowTask", FileSystemId="bmcpfs-370jz26fkr2st9", DataFlowId=flow_id,
                  TaskAction="StreamImport", Directory="/test/", DstDirectory="/mnt/")["TaskId"]
    svc.ok("CreateDataFlowSubTask", FileSystemId="bmcpfs-370jz26fkr2st9", DataFlowId=flow_id, DataFlowTaskId=task,
           SrcFilePath="/file.xml", DstFilePath="/mnt/file.xml")
    svc.wait(lambda: (mount / "oss" / "mnt" / "file.xml").exists(), 60, "the file")
    assert (mount / "oss" / "mnt" / "file.xml").read_bytes() == b"<xml/>"
    got, body = svc.call("CreateDataFlow", FileSystemId="bmcpfs-370jz26fkr2st9", SourceStorage=address,
                         FileSystemPath="/missing/")
    assert got == 400 and "FileSystemPath" in body["Message"] and "create it first" in body["Message"]
    got, body = svc.call("CreateDataFlow", FileSystemId="bmcpfs-unknown", SourceStorage=address)
    assert (got, body["Code"]) == (404, "InvalidFileSystem.NotFound") and "conf" in body["Message"]


def test_batch_import_and_export_run_as_jobs(tmp_path: Path, backend_factory: Any) -> None:
    env = ServiceEnv(tmp_path)  # with the job master and a worker
    env.start()
    try:
        flow = Flow(env, backend_factory("s3-moto"), tmp_path)
        files = {f"test/d{i % 2}/f{i}.txt": f"file {i}".encode() * (i + 1) for i in range(7)}
        for key, data in files.items():
            flow.put(key, data)
        fs = str(flow.fs)

        def task_of(task_id: str) -> dict[str, Any] | None:
            tasks = env.ok("DescribeDataFlowTasks", FileSystemId=fs,
                           Filters=[{"Key": "TaskIds", "Value": task_id}])["TaskInfo"]["Task"]
            return tasks[0] if tasks[0]["Status"] in ("Completed", "Failed") else None

        got, body = env.call("CreateDataFlowTask", FileSystemId=fs, DataFlowId=flow.flow_id, TaskAction="Import",
                             Directory="/test/", DstDirectory="/in/", ConflictPolicy="KEEP_LATEST")
        assert got == 400 and "KEEP_LATEST" in body["Message"]
        imported = flow.task("Import", "/test/", "/in/")
        task = env.wait(lambda: task_of(imported), 120, "the import")
        assert task["Status"] == "Completed" and task["Progress"] == 10000
        assert task["ProgressStats"]["FilesDone"] == len(files)
        assert task["ProgressStats"]["BytesDone"] == sum(map(len, files.values()))
        for key, data in files.items():
            assert (flow.fs / "oss" / "in" / key.removeprefix("test/")).read_bytes() == data
        exported = flow.task("Export", "/in/", "/back/")
        assert env.wait(lambda: task_of(exported), 120, "the export")["Status"] == "Completed"
        for key, data in files.items():
            assert flow.get("back/" + key.removeprefix("test/")) == data
        jobs = [j["JobName"] for j in env.ok("DescribeJobs")["Jobs"]["Job"]]
        assert sorted(jobs) == sorted([imported, exported])
    finally:
        env.stop()


def test_dataflow_quota_and_task_paging(flow: Flow) -> None:
    svc, fs = flow.svc, str(flow.fs)
    for _ in range(9):
        svc.ok("CreateDataFlow", FileSystemId=fs, SourceStorage=flow.address, FileSystemPath="/oss/")
    got, body = svc.call("CreateDataFlow", FileSystemId=fs, SourceStorage=flow.address, FileSystemPath="/oss/")
    assert (got, body["Code"]) == (400, "QuotaExceeded.DataFlow")
    page = svc.ok("DescribeDataFlows", FileSystemId=fs, MaxResults=10)
    assert len(page["DataFlowInfo"]["DataFlow"]) == 10 and page["NextToken"] == ""
    got, body = svc.call("DescribeDataFlows", FileSystemId=fs, MaxResults=9)
    assert got == 400 and "10 to 100" in body["Message"]
    only = svc.ok("DescribeDataFlows", FileSystemId=fs, Filters=[{"Key": "DataFlowIds", "Value": flow.flow_id}])
    assert [f["DataFlowId"] for f in only["DataFlowInfo"]["DataFlow"]] == [flow.flow_id]
    got, body = svc.call("DescribeDataFlows", FileSystemId=fs, Filters=[{"Key": "Colour", "Value": "x"}])
    assert got == 400 and "DataFlowIds" in body["Message"]
    made = [flow.task("StreamImport", f"/d{i}/", "/x/") for i in range(12)]
    seen: list[str] = []
    token = ""
    for _ in range(4):
        page = svc.ok("DescribeDataFlowTasks", FileSystemId=fs, MaxResults=10, NextToken=token)
        seen += [t["TaskId"] for t in page["TaskInfo"]["Task"]]
        token = page["NextToken"]
        if not token:
            break
    assert seen == made


def test_a_file_system_on_sftp(tmp_path: Path, backend_factory: Any) -> None:
    """conf/filesystems may name an SFTP directory: a stream import writes there over SFTP."""
    sftp = backend_factory("sftp")
    s3 = backend_factory("s3-moto")
    sroot = sftp.new_root()
    env = ServiceEnv(tmp_path, workers=False)
    env.env.update(sftp.env())
    (env.conf / "filesystems").write_text(f"nas-1 = {sftp.address(sroot)}\n", encoding="utf-8")
    env.start()
    try:
        root = s3.new_root()
        data = random.Random(9).randbytes(3 * MiB)
        s3.storage(root).put("in/big.bin", io.BytesIO(data), len(data))
        flow_id = env.ok("CreateDataFlow", FileSystemId="nas-1", SourceStorage=s3.address(root).rsplit("/", 2)[0],
                         SourceStoragePath=f"/{root}/")["DataFlowId"]
        task = env.ok("CreateDataFlowTask", FileSystemId="nas-1", DataFlowId=flow_id, TaskAction="StreamImport",
                      Directory="/in/", DstDirectory="/landing/")["TaskId"]
        sub = env.ok("CreateDataFlowSubTask", FileSystemId="nas-1", DataFlowId=flow_id, DataFlowTaskId=task,
                     SrcFilePath="/big.bin", DstFilePath="/big.bin")["DataFlowSubTaskId"]

        def done() -> dict[str, Any] | None:
            items = env.ok("DescribeDataFlowSubTasks", FileSystemId="nas-1", Filters=[
                {"Key": "DataFlowSubTaskIds", "Value": sub}])["DataFlowSubTask"]["DataFlowSubTask"]
            return items[0] if items[0]["Status"] in ("COMPLETE", "FAILED") else None

        item = env.wait(done, 120, "the subtask")
        assert item["Status"] == "COMPLETE", item
        assert item["FileDetail"]["Checksum"] == crc64(data)
        with sftp.storage(sroot).open("landing/big.bin") as f:
            assert f.read() == data
    finally:
        env.stop()


@BOTH
def test_a_graceful_stop_of_the_service_resumes_running_subtasks_on_start(
        slow_flow: tuple[Flow, FaultProxy]) -> None:
    flow, proxy = slow_flow
    data = random.Random(10).randbytes(4 * MiB)
    flow.put("test/big.bin", data)
    proxy.add(Fault("slow_down", count=1, method="GET", path=r"big\.bin$", bps=512 * 1024))
    task = flow.task("StreamImport")
    sub = flow.sub(task, "/big.bin", "/big.bin")
    flow.svc.wait(lambda: flow.describe(sub)["ProgressStats"]["BytesDone"] > 0, 60, "bytes to arrive")
    assert flow.svc.proc is not None
    flow.svc.proc.terminate()  # SIGTERM: the user stops the service, nobody canceled the subtask
    flow.svc.proc.wait(60)
    flow.svc.proc = None
    flow.svc.start()
    s = flow.wait(sub, {"COMPLETE", "FAILED", "CANCELED"})
    assert s["Status"] == "COMPLETE", s
    assert (flow.fs / "oss" / "mnt" / "big.bin").read_bytes() == data


@BOTH
def test_cancel_of_a_running_multipart_export_leaves_no_object_and_no_upload(
        slow_flow: tuple[Flow, FaultProxy]) -> None:
    flow, proxy = slow_flow
    (flow.fs / "oss" / "big").mkdir()
    data = random.Random(11).randbytes(20 * MiB)  # over the 16 MiB threshold: a multipart upload
    (flow.fs / "oss" / "big" / "large.bin").write_bytes(data)
    proxy.add(Fault("slow_up", probability=1.0, method="PUT", path=r"large\.bin$", bps=2 * MiB))
    task = flow.task("StreamExport", "/big/", "/out/")
    sub = flow.sub(task, "/large.bin", "/large.bin")
    flow.svc.wait(lambda: flow.describe(sub)["ProgressStats"]["BytesDone"] > 0, 60, "a part to arrive")
    flow.svc.ok("CancelDataFlowSubTask", FileSystemId=str(flow.fs), DataFlowId=flow.flow_id, DataFlowTaskId=task,
                DataFlowSubTaskId=sub)
    s = flow.wait(sub, {"CANCELED", "COMPLETE", "FAILED"}, 120)
    assert s["Status"] == "CANCELED", s
    assert [e.key for e in flow.bucket.list()] == []
    assert list(flow.bucket.list_multipart()) == [], "the multipart upload was aborted"


def test_subtasks_spread_over_the_connected_workers(backend_factory: Any, tmp_path: Path) -> None:
    """Two workers, eight slow subtasks: both workers copy at once (each holds connections to the
    object store), and every file arrives whole."""
    import psutil

    env = ServiceEnv(tmp_path, {"workerCount": 2})
    env.start()
    try:
        env.wait(lambda: (metric(env, 'ossimport_workers{kind="connected"}') or 0) >= 2, 60, "two workers")
        s3 = backend_factory("s3-moto")
        with FaultProxy("127.0.0.1", s3.handle.port) as proxy:
            address = f"s3://AKIDTEST1234:SECRET%2FTEST5678@{s3.handle.bucket}.127.0.0.1:{proxy.port}"
            flow = Flow(env, s3, tmp_path, address)
            files = {f"f{i}.bin": random.Random(i).randbytes(512 * 1024) for i in range(8)}
            for name, data in files.items():
                flow.put(f"test/{name}", data)
            proxy.add(Fault("slow_down", probability=1.0, method="GET", path=r"\.bin$", bps=1 * MiB))  # shared by all
            task = flow.task("StreamImport")
            subs = [flow.sub(task, f"/{name}", f"/{name}") for name in files]
            workers = [psutil.Process(int(p.read_text())) for p in (env.workdir / "run").glob("worker-*.pid")]
            assert len(workers) == 2

            def both_copying() -> bool:
                return all(any(c.raddr and c.raddr.port == proxy.port for c in w.net_connections("tcp"))
                           for w in workers)

            env.wait(both_copying, 60, "both workers to copy")
            for sub in subs:
                assert flow.wait(sub, {"COMPLETE", "FAILED", "CANCELED"}, 120)["Status"] == "COMPLETE"
            for name, data in files.items():
                assert (flow.fs / "oss" / "mnt" / name).read_bytes() == data
            assert metric(env, 'ossimport_subtasks_started_total{runner="service"}') == 0
    finally:
        env.stop()
