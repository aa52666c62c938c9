"""Dataflow and dataflow-task actions (CPFS names, fields and envelopes; REFERENCE 3 and 3a).

Dataflow status: Running or Stopped here (Misconfigured when its object store could not be
reached at creation); streaming tasks are Executing until canceled; batch Import / Export tasks
are jobs of the job system (batch.py) and take their status from the job.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from ossimport.engine.policy import CONFLICT_POLICIES
from ossimport.errors import OssimportError
from ossimport.service import batch, paths
from ossimport.service.api import Common, action, paging
from ossimport.service.errors import ApiError, invalid
from ossimport.service.subtasks import now
from ossimport.storage import open_storage
from ossimport.storage.base import StorageOptions

MAX_FLOWS_PER_FS = 10
STREAMING = ("StreamImport", "StreamExport")
BATCH = ("Import", "Export")


@dataclass(kw_only=True)
class CreateDataFlowRequest(Common):
    FileSystemId: str
    SourceStorage: str
    FileSystemPath: str = "/"
    SourceStoragePath: str = "/"
    Description: str = ""
    Throughput: int = 0


@dataclass(kw_only=True)
class DataFlowRequest(Common):
    FileSystemId: str
    DataFlowId: str


@dataclass(kw_only=True)
class DescribeRequest(Common):
    FileSystemId: str
    Filters: list[dict[str, Any]] = field(default_factory=list)
    MaxResults: int = 0
    NextToken: str = ""


@dataclass(kw_only=True)
class CreateDataFlowTaskRequest(Common):
    FileSystemId: str
    DataFlowId: str
    TaskAction: str
    DataType: str = "MetaAndData"
    Directory: str = "/"
    DstDirectory: str = "/"
    ConflictPolicy: str = "SKIP_THE_FILE"


@dataclass(kw_only=True)
class CancelDataFlowTaskRequest(Common):
    FileSystemId: str
    DataFlowId: str
    TaskId: str


def new_id(prefix: str, token: str = "") -> str:
    """A fresh id; with a ClientToken, the same id for the same token (see `created`)."""
    if token:
        return prefix + hashlib.sha256(f"{prefix}\0{token}".encode()).hexdigest()[:16]
    return f"{prefix}{secrets.token_hex(8)}"


def created(svc: Any, table: str, id_: str) -> bool:
    """Whether a create with this ClientToken already happened: the record is written before the
    token's answer is, so a kill between the two must not make the retried create a second one."""
    return svc.db.one(f"SELECT 1 AS x FROM {table} WHERE id = ?", (id_,)) is not None


def flow_of(svc: Any, fs_id: str, flow_id: str) -> dict[str, Any]:
    row = svc.db.one("SELECT * FROM dataflows WHERE id = ? AND fs_id = ?", (flow_id, fs_id))
    if row is None:
        raise ApiError("InvalidDataFlow.NotFound", f"no dataflow {flow_id!r} on file system {fs_id!r}")
    return row


def filters(items: list[dict[str, Any]], allowed: dict[str, str]) -> tuple[list[str], list[Any]]:
    """SQL conditions for Filters [{Key, Value}]: allowed maps a Key to 'exact:<col>' (comma-
    separated values) or 'fuzzy:<col>' (substring)."""
    where: list[str] = []
    args: list[Any] = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or "Key" not in item:
            raise invalid(f"Filters.{i}", "each filter is {Key, Value}")
        key, value = str(item["Key"]), str(item.get("Value", ""))
        if key not in allowed:
            raise invalid(f"Filters.{i}.Key", f"{key!r} is not allowed; use one of: {', '.join(allowed)}")
        kind, col = allowed[key].split(":")
        if kind == "exact":
            values = [v.strip() for v in value.split(",") if v.strip()]
            if len(values) > 10 and key.endswith("Ids"):
                raise invalid(f"Filters.{i}.Value", "at most 10 ids")
            where.append(f"{col} IN ({', '.join('?' for _ in values)})" if values else "0")
            args.extend(values)
        else:
            where.append(f"instr({col}, ?) > 0")
            args.append(value)
    return where, args


# ---- dataflows -----------------------------------------------------------------------------------
def flow_item(row: dict[str, Any]) -> dict[str, Any]:
    return {"DataFlowId": row["id"], "FileSystemId": row["fs_id"], "FileSystemPath": row["fs_path"],
            "SourceStorage": row["source_display"], "SourceStoragePath": row["source_storage_path"],
            "Description": row["description"], "Status": row["status"], "Throughput": row["throughput"],
            "ErrorMessage": row["error"], "CreateTime": row["create_time"], "UpdateTime": row["update_time"],
            "SourceSecurityType": "NONE", "AutoRefreshPolicy": "None", "AutoRefreshInterval": 0}


@action(CreateDataFlowRequest, creates=True)
def CreateDataFlow(svc: Any, req: CreateDataFlowRequest) -> dict[str, Any]:
    """Map FileSystemId + FileSystemPath to an object store (SourceStorage + SourceStoragePath)."""
    fs_path = paths.check_path("FileSystemPath", req.FileSystemPath, directory=True)
    store_path = paths.check_path("SourceStoragePath", req.SourceStoragePath, directory=True)
    fs_root = paths.file_system_root(svc.conf_dir, req.FileSystemId, fs_path)
    store = paths.object_store(req.SourceStorage)
    if len(req.Description.encode()) > 255:
        raise invalid("Description", "at most 255 bytes")
    if req.Throughput < 0:
        raise invalid("Throughput", "must not be negative")
    count = svc.db.one("SELECT COUNT(*) AS n FROM dataflows WHERE fs_id = ?", (req.FileSystemId,))
    if count and count["n"] >= MAX_FLOWS_PER_FS:
        raise ApiError("QuotaExceeded.DataFlow", f"file system {req.FileSystemId!r} has {MAX_FLOWS_PER_FS} "
                       "dataflows already; delete one first")
    if req.DryRun:
        return {"DataFlowId": ""}
    status, error = "Running", ""
    for loc in (fs_root, paths.object_root(store, store_path)):
        try:  # reachable now, or Misconfigured with the reason (the ids still work for Delete)
            st = open_storage(loc, StorageOptions())
            try:
                next(iter(st.list()), None)
            finally:
                st.close()
        except OssimportError as exc:
            status, error = "Misconfigured", f"{exc.code}: {exc}"
            break
    flow_id = new_id("df-", req.ClientToken)
    if created(svc, "dataflows", flow_id):
        return {"DataFlowId": flow_id}
    stamp = now()
    svc.db.insert("dataflows", {
        "id": flow_id, "fs_id": req.FileSystemId, "fs_path": fs_path, "source_storage": req.SourceStorage,
        "source_display": paths.shown(store), "source_storage_path": store_path, "description": req.Description,
        "status": status, "throughput": req.Throughput, "error": error, "create_time": stamp, "update_time": stamp})
    return {"DataFlowId": flow_id}


@action(DescribeRequest)
def DescribeDataFlows(svc: Any, req: DescribeRequest) -> dict[str, Any]:
    """The file system's dataflows (Filters, MaxResults 10-100, NextToken)."""
    limit = paging(req.MaxResults, 10, 100, 20)
    where, args = filters(req.Filters, {
        "DataFlowIds": "exact:id", "FsetIds": "exact:fs_id", "FileSystemPath": "fuzzy:fs_path",
        "SourceStorage": "exact:source_display", "ThroughputList": "exact:throughput",
        "Description": "fuzzy:description", "Status": "exact:status", "SourceStoragePath": "fuzzy:source_storage_path"})
    rows, token = svc.db.page("dataflows", ["fs_id = ?", *where], [req.FileSystemId, *args], limit, req.NextToken)
    return {"DataFlowInfo": {"DataFlow": [flow_item(r) for r in rows]}, "NextToken": token}


def _busy_subtasks(svc: Any, column: str, value: str) -> int:
    row = svc.db.one(f"SELECT COUNT(*) AS n FROM subtasks WHERE {column} = ? AND status IN "
                     "('CREATED', 'RUNNING', 'CANCELING')", (value,))
    return int(row["n"]) if row else 0


@action(DataFlowRequest)
def DeleteDataFlow(svc: Any, req: DataFlowRequest) -> dict[str, Any]:
    """Delete a Running or Stopped dataflow with no subtask waiting or running."""
    flow = flow_of(svc, req.FileSystemId, req.DataFlowId)
    if flow["status"] not in ("Running", "Stopped", "Misconfigured"):
        raise ApiError("InvalidStatus.ResourceMismatch", f"dataflow {flow['id']} is {flow['status']}")
    if _busy_subtasks(svc, "dataflow_id", flow["id"]):
        raise ApiError("InvalidStatus.ResourceMismatch", f"dataflow {flow['id']} has subtasks waiting or "
                       "running; cancel them first")
    if not req.DryRun:
        svc.db.execute("DELETE FROM subtasks WHERE dataflow_id = ?", (flow["id"],))
        svc.db.execute("DELETE FROM tasks WHERE dataflow_id = ?", (flow["id"],))
        svc.db.execute("DELETE FROM dataflows WHERE id = ?", (flow["id"],))
        svc.executor.forget(flow["id"])
    return {}


def _switch(svc: Any, req: DataFlowRequest, status: str) -> dict[str, Any]:
    """Running <-> Stopped (either way from either: a repeated call changes nothing)."""
    flow = flow_of(svc, req.FileSystemId, req.DataFlowId)
    if flow["status"] not in ("Running", "Stopped"):
        raise ApiError("InvalidStatus.ResourceMismatch", f"dataflow {flow['id']} is {flow['status']}")
    if not req.DryRun:
        svc.db.update("dataflows", flow["id"], {"status": status, "update_time": now()})
        svc.executor.wake()
    return {}


@action(DataFlowRequest)
def StopDataFlow(svc: Any, req: DataFlowRequest) -> dict[str, Any]:
    """Stop starting subtasks (running copies finish; waiting ones wait for StartDataFlow)."""
    return _switch(svc, req, "Stopped")


@action(DataFlowRequest)
def StartDataFlow(svc: Any, req: DataFlowRequest) -> dict[str, Any]:
    """Start a stopped dataflow; its waiting subtasks run."""
    return _switch(svc, req, "Running")


# ---- tasks ---------------------------------------------------------------------------------------
def task_item(svc: Any, row: dict[str, Any], flow: dict[str, Any] | None) -> dict[str, Any]:
    item = _task_fields(svc, row, flow)
    if row["action"] in BATCH and row["status"] != "Canceled":
        found = batch.progress(svc, row["id"])
        if found is None:
            item.update(Status="Failed", ErrorMsg=f"its job {row['id']} was deleted")
        else:
            status, job = found
            item.update(Status=status, Progress=job["Progress"], ProgressStats={
                "FilesTotal": job["FilesTotal"], "FilesDone": job["FilesDone"], "ActualFiles": job["FilesDone"],
                "BytesTotal": job["BytesTotal"], "BytesDone": job["BytesDone"], "ActualBytes": job["BytesDone"],
                "AverageSpeed": int(job["Throughput"] or 0), "RemainTime": job["Eta"] or 0})
            if status == "Failed":
                item["ErrorMsg"] = f"{job['FilesFailed']} files failed: DescribeJob {row['id']} lists them; RetryJob retries"
    return item


def _task_fields(svc: Any, row: dict[str, Any], flow: dict[str, Any] | None) -> dict[str, Any]:
    counts = {r["status"]: r for r in svc.db.all(
        "SELECT status, COUNT(*) AS n, COALESCE(SUM(bytes_total), 0) AS total, COALESCE(SUM(actual_bytes), 0) AS "
        "actual FROM subtasks WHERE task_id = ? GROUP BY status", (row["id"],))}
    files = sum(r["n"] for r in counts.values())
    done = counts.get("COMPLETE", {"n": 0, "total": 0, "actual": 0})
    return {"TaskId": row["id"], "DataFlowId": row["dataflow_id"], "FilesystemId": flow["fs_id"] if flow else "",
            "TaskAction": row["action"], "DataType": row["data_type"], "Directory": row["directory"],
            "DstDirectory": row["dst_directory"], "ConflictPolicy": row["conflict_policy"],
            "Status": row["status"], "ErrorMsg": row["error"], "CreateTime": row["create_time"],
            "StartTime": row["start_time"], "EndTime": row["end_time"], "Originator": "User",
            "SourceStorage": flow["source_display"] if flow else "", "FileSystemPath": flow["fs_path"] if flow else "",
            "Progress": done["n"] * 10000 // files if files else 0,
            "ProgressStats": {"FilesTotal": files, "FilesDone": done["n"], "ActualFiles": done["n"],
                              "BytesTotal": sum(r["total"] for r in counts.values()), "BytesDone": done["total"],
                              "ActualBytes": done["actual"], "AverageSpeed": 0, "RemainTime": 0}}


@action(CreateDataFlowTaskRequest, creates=True)
def CreateDataFlowTask(svc: Any, req: CreateDataFlowTaskRequest) -> dict[str, Any]:
    """A streaming task (StreamImport / StreamExport): a tunnel that moves nothing until subtasks arrive."""
    flow = flow_of(svc, req.FileSystemId, req.DataFlowId)
    if req.TaskAction not in (*STREAMING, *BATCH):
        raise invalid("TaskAction", f"{req.TaskAction!r} is not allowed; use StreamImport, StreamExport, Import "
                      "or Export")
    if req.DataType != "MetaAndData":
        raise invalid("DataType", f"{req.DataType!r} is not allowed; use MetaAndData")
    if req.ConflictPolicy not in CONFLICT_POLICIES:
        raise invalid("ConflictPolicy", f"{req.ConflictPolicy!r} is not allowed; use one of: "
                      f"{', '.join(CONFLICT_POLICIES)}")
    paths.check_path("Directory", req.Directory, directory=True)
    paths.check_path("DstDirectory", req.DstDirectory, directory=True)
    if flow["status"] != "Running":
        raise ApiError("InvalidStatus.ResourceMismatch", f"dataflow {flow['id']} is {flow['status']}; "
                       "start it first")
    task_id = new_id("task-", req.ClientToken)
    if not req.DryRun and created(svc, "tasks", task_id):
        return {"TaskId": task_id}
    # the job first: a kill before the row leaves a visible job (which a retry with the token finds)
    if req.TaskAction in BATCH and not svc.workdir.exists(task_id):
        batch.submit(svc, flow, task_id, req.TaskAction, req.Directory, req.DstDirectory, req.ConflictPolicy,
                     req.DryRun)
    if req.DryRun:
        return {"TaskId": ""}
    stamp = now()
    svc.db.insert("tasks", {"id": task_id, "dataflow_id": flow["id"], "action": req.TaskAction,
                            "data_type": req.DataType, "directory": req.Directory, "dst_directory": req.DstDirectory,
                            "conflict_policy": req.ConflictPolicy, "status": "Executing", "create_time": stamp,
                            "start_time": stamp})
    return {"TaskId": task_id}


@action(DescribeRequest)
def DescribeDataFlowTasks(svc: Any, req: DescribeRequest) -> dict[str, Any]:
    """The file system's dataflow tasks (Filters DataFlowIds, TaskIds, TaskActions, Status)."""
    limit = paging(req.MaxResults, 10, 100, 20)
    where, args = filters(req.Filters, {"DataFlowIds": "exact:dataflow_id", "TaskIds": "exact:id",
                                        "TaskActions": "exact:action", "Status": "exact:status",
                                        "Directory": "fuzzy:directory", "DstDirectory": "fuzzy:dst_directory"})
    where.insert(0, "dataflow_id IN (SELECT id FROM dataflows WHERE fs_id = ?)")
    rows, token = svc.db.page("tasks", where, [req.FileSystemId, *args], limit, req.NextToken)
    flows = {r["dataflow_id"]: svc.db.one("SELECT * FROM dataflows WHERE id = ?", (r["dataflow_id"],)) for r in rows}
    return {"TaskInfo": {"Task": [task_item(svc, r, flows[r["dataflow_id"]]) for r in rows]}, "NextToken": token}


@action(CancelDataFlowTaskRequest)
def CancelDataFlowTask(svc: Any, req: CancelDataFlowTaskRequest) -> dict[str, Any]:
    """Cancel a task: refused while any of its subtasks runs; waiting ones are canceled with it."""
    flow = flow_of(svc, req.FileSystemId, req.DataFlowId)
    task = svc.db.one("SELECT * FROM tasks WHERE id = ? AND dataflow_id = ?", (req.TaskId, flow["id"]))
    if task is None:
        raise ApiError("InvalidTask.NotFound", f"no task {req.TaskId!r} in dataflow {flow['id']}")
    if task["status"] not in ("Pending", "Executing"):
        raise ApiError("InvalidStatus.ResourceMismatch", f"task {task['id']} is {task['status']}")
    running = svc.db.one("SELECT COUNT(*) AS n FROM subtasks WHERE task_id = ? AND status IN ('RUNNING', 'CANCELING')",
                         (task["id"],))
    if running and running["n"]:
        raise ApiError("InvalidStatus.ResourceMismatch", f"task {task['id']} has {running['n']} subtasks running; "
                       "cancel them or wait for them to finish")
    if not req.DryRun:
        stamp = now()
        if task["action"] in BATCH:
            svc.workdir.clean(task["id"])  # = console.sh clean: the job's state goes
        svc.db.update("tasks", task["id"], {"status": "Canceled", "end_time": stamp})
        svc.db.execute("UPDATE subtasks SET status = 'CANCELED', end_time = ? WHERE task_id = ? AND status = 'CREATED'",
                       (stamp, task["id"]))
    return {}
