"""EXPIRED subtasks over the JSON door: a subtask that waits on a Stopped dataflow past
serviceSubTaskExpireSeconds (or waited while the service was down) becomes EXPIRED with the reason,
is announced on /api/events, is found by its status, cannot be canceled, and never runs once the
dataflow starts; 0 means never."""

from __future__ import annotations

import http.client
import json
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from serviceenv import ServiceEnv
from test_service_dataflows import Flow

EXPIRE = 2  # seconds


def test_a_subtask_waiting_past_the_limit_expires_and_never_runs(tmp_path: Path, backend_factory: Any) -> None:
    svc = ServiceEnv(tmp_path, {"serviceSubTaskExpireSeconds": EXPIRE}, workers=False)
    svc.start()
    try:
        flow = Flow(svc, backend_factory("s3-moto"), tmp_path)
        fs = str(flow.fs)
        flow.put("test/late.txt", b"waited too long")
        task = flow.task("StreamImport")
        svc.ok("StopDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
        url = urlsplit(svc.url)
        events = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        events.request("GET", "/api/events")
        stream = events.getresponse()
        assert stream.readline() == b": connected\n"

        late = flow.sub(task, "/late.txt", "/late.txt")
        s = flow.wait(late, {"EXPIRED", "COMPLETE", "FAILED", "CANCELED"}, 30)
        assert s["Status"] == "EXPIRED", s
        assert f"serviceSubTaskExpireSeconds={EXPIRE}" in s["ErrorMsg"] and "create the subtask again" in s["ErrorMsg"]
        assert s["EndTime"] and s["Progress"] == 0

        announced = None
        deadline = time.monotonic() + 30
        while announced is None and time.monotonic() < deadline:
            line = stream.readline().decode()
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if data.get("DataFlowSubTaskId") == late and data.get("Status") == "EXPIRED":
                    announced = data
        events.close()
        assert announced is not None and announced["ErrorMsg"] == s["ErrorMsg"]

        found = svc.ok("DescribeDataFlowSubTasks", FileSystemId=fs, Filters=[{"Key": "Status", "Value": "EXPIRED"}])
        assert [x["DataFlowSubTaskId"] for x in found["DataFlowSubTask"]["DataFlowSubTask"]] == [late]
        status, body = svc.call("CancelDataFlowSubTask", FileSystemId=fs, DataFlowId=flow.flow_id,
                                DataFlowTaskId=task, DataFlowSubTaskId=late)
        assert (status, body["Code"]) == (400, "InvalidStatus.ResourceMismatch") and "EXPIRED" in body["Message"]

        # started again, the dataflow runs what is new (oldest first) and not what expired
        svc.ok("StartDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
        flow.put("test/fresh.txt", b"on time")
        fresh = flow.sub(task, "/fresh.txt", "/fresh.txt")
        assert flow.wait(fresh, {"COMPLETE", "FAILED"})["Status"] == "COMPLETE"
        assert (flow.fs / "oss" / "mnt" / "fresh.txt").read_bytes() == b"on time"
        assert not (flow.fs / "oss" / "mnt" / "late.txt").exists()
        assert flow.describe(late)["Status"] == "EXPIRED"
    finally:
        svc.stop()


@pytest.mark.parametrize("limit, expected", [(None, "EXPIRED"), (0, "CREATED")], ids=["default-24h", "0-never"])
def test_a_subtask_that_waited_past_the_limit_while_the_service_was_down(
        tmp_path: Path, backend_factory: Any, limit: int | None, expected: str) -> None:
    svc = ServiceEnv(tmp_path, {} if limit is None else {"serviceSubTaskExpireSeconds": limit}, workers=False)
    svc.start()
    try:
        flow = Flow(svc, backend_factory("s3-moto"), tmp_path)
        fs = str(flow.fs)
        flow.put("test/waiting.txt", b"created two days ago")
        task = flow.task("StreamImport")
        svc.ok("StopDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
        sub = flow.sub(task, "/waiting.txt", "/waiting.txt")
        address = svc.url.removeprefix("http://")
        svc.kill9()
        conn = sqlite3.connect(svc.workdir / "service" / "service.db")  # two days pass while it is down
        with conn:
            conn.execute("UPDATE subtasks SET create_time = datetime(create_time, '-2 days') WHERE id = ?", (sub,))
        conn.close()
        svc.start(listen=address)  # it answers once its start-up sweep is done

        s = flow.describe(sub)
        assert s["Status"] == expected, s
        if expected == "EXPIRED":
            assert "serviceSubTaskExpireSeconds=86400" in s["ErrorMsg"]
            return
        svc.ok("StartDataFlow", FileSystemId=fs, DataFlowId=flow.flow_id)
        assert flow.wait(sub, {"COMPLETE", "FAILED", "EXPIRED"})["Status"] == "COMPLETE"
        assert (flow.fs / "oss" / "mnt" / "waiting.txt").read_bytes() == b"created two days ago"
    finally:
        svc.stop()
