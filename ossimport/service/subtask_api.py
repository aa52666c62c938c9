"""Subtask actions: CreateDataFlowSubTask, DescribeDataFlowSubTasks, CancelDataFlowSubTask.

A subtask is one file; it is recorded CREATED and handed to the executor (subtasks.py). Describe
shows a running subtask's live bytes and Progress (0..9999 while it copies, 10000 once COMPLETE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ossimport.service import paths
from ossimport.service.api import Common, action, paging
from ossimport.service.dataflow_api import DescribeRequest, created, filters, flow_of, new_id
from ossimport.service.errors import ApiError, invalid
from ossimport.service.subtasks import now


@dataclass(kw_only=True)
class CreateDataFlowSubTaskRequest(Common):
    FileSystemId: str
    DataFlowId: str
    DataFlowTaskId: str
    SrcFilePath: str
    DstFilePath: str
    Condition: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class CancelDataFlowSubTaskRequest(Common):
    FileSystemId: str
    DataFlowId: str
    DataFlowTaskId: str
    DataFlowSubTaskId: str


def _condition(cond: dict[str, Any]) -> tuple[int | None, int | None]:
    out: list[int | None] = []
    for key in ("ModifyTime", "Size"):
        value = cond.get(key)
        if value in (None, ""):
            out.append(None)
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise invalid(f"Condition.{key}", f"{value!r} is not a whole number") from None
        if number < 0:
            raise invalid(f"Condition.{key}", "must not be negative")
        out.append(number)
    return out[0], out[1]


@action(CreateDataFlowSubTaskRequest, creates=True)
def CreateDataFlowSubTask(svc: Any, req: CreateDataFlowSubTaskRequest) -> dict[str, Any]:
    """Move one file through a streaming task; Condition {ModifyTime ns, Size} is checked against
    the source before copying."""
    flow = flow_of(svc, req.FileSystemId, req.DataFlowId)
    task = svc.db.one("SELECT * FROM tasks WHERE id = ? AND dataflow_id = ?", (req.DataFlowTaskId, flow["id"]))
    if task is None:
        raise ApiError("InvalidTask.NotFound", f"no task {req.DataFlowTaskId!r} in dataflow {flow['id']}")
    paths.check_path("SrcFilePath", req.SrcFilePath, directory=False)
    paths.check_path("DstFilePath", req.DstFilePath, directory=False)
    mtime, size = _condition(req.Condition)
    if task["action"] not in ("StreamImport", "StreamExport"):
        raise ApiError("InvalidStatus.ResourceMismatch", f"task {task['id']} is not a streaming task")
    if task["status"] != "Executing":
        raise ApiError("InvalidStatus.ResourceMismatch", f"task {task['id']} is {task['status']}")
    if flow["status"] not in ("Running", "Stopped"):
        raise ApiError("InvalidStatus.ResourceMismatch", f"dataflow {flow['id']} is {flow['status']}")
    if req.DryRun:
        return {"DataFlowSubTaskId": ""}
    sub_id = new_id("subTaskId-", req.ClientToken)
    if created(svc, "subtasks", sub_id):
        return {"DataFlowSubTaskId": sub_id}
    svc.db.insert("subtasks", {"id": sub_id, "dataflow_id": flow["id"], "task_id": task["id"],
                               "src_path": req.SrcFilePath, "dst_path": req.DstFilePath, "cond_mtime": mtime,
                               "cond_size": size, "status": "CREATED", "create_time": now()})
    svc.executor.wake()
    return {"DataFlowSubTaskId": sub_id}


def subtask_item(svc: Any, row: dict[str, Any], flow: dict[str, Any] | None,
                 task: dict[str, Any] | None) -> dict[str, Any]:
    progress, done, speed = row["progress"], row["bytes_done"], row["average_speed"]
    if row["status"] in ("RUNNING", "CANCELING"):
        live = svc.executor.live(row["id"])
        if live is not None:
            done = live[0]
            total = row["bytes_total"]
            progress = min(9999, done * 10000 // total) if total else 0
            speed = int(done / live[1]) if live[1] > 0 else 0
    src = dst = ""
    if flow and task:  # full paths, as the CPFS answers show them
        importing = task["action"] == "StreamImport"
        src_root, dst_root = ((flow["source_storage_path"], flow["fs_path"]) if importing
                              else (flow["fs_path"], flow["source_storage_path"]))
        src = src_root + paths.source_key(task["directory"], row["src_path"])
        dst = dst_root + paths.destination_key(task["dst_directory"], row["dst_path"])
    detail: dict[str, Any] = {}
    if row["file_size"] is not None:
        detail = {"ModifyTime": row["file_mtime"], "Size": row["file_size"], "Checksum": row["checksum"]}
    return {"FileSystemId": flow["fs_id"] if flow else "", "DataFlowId": row["dataflow_id"],
            "DataFlowTaskId": row["task_id"], "DataFlowSubTaskId": row["id"], "SrcFilePath": src or row["src_path"],
            "DstFilePath": dst or row["dst_path"], "Status": row["status"], "Progress": progress,
            "ErrorMsg": row["error"], "CreateTime": row["create_time"], "StartTime": row["start_time"],
            "EndTime": row["end_time"],
            "ProgressStats": {"BytesTotal": row["bytes_total"], "BytesDone": done, "ActualBytes": row["actual_bytes"],
                              "AverageSpeed": speed},
            "FileDetail": detail}


@action(DescribeRequest)
def DescribeDataFlowSubTasks(svc: Any, req: DescribeRequest) -> dict[str, Any]:
    """Subtasks (Filters DataFlowIds, DataFlowTaskIds, DataFlowSubTaskIds, Status, SrcFilePath,
    DstFilePath; MaxResults 20-100)."""
    limit = paging(req.MaxResults, 20, 100, 20)
    where, args = filters(req.Filters, {"DataFlowIds": "exact:dataflow_id", "DataFlowTaskIds": "exact:task_id",
                                        "DataFlowSubTaskIds": "exact:id", "Status": "exact:status",
                                        "SrcFilePath": "fuzzy:src_path", "DstFilePath": "fuzzy:dst_path"})
    where.insert(0, "dataflow_id IN (SELECT id FROM dataflows WHERE fs_id = ?)")
    rows, token = svc.db.page("subtasks", where, [req.FileSystemId, *args], limit, req.NextToken)
    flows: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    for r in rows:
        if r["dataflow_id"] not in flows:
            flows[r["dataflow_id"]] = svc.db.one("SELECT * FROM dataflows WHERE id = ?", (r["dataflow_id"],))
        if r["task_id"] not in tasks:
            tasks[r["task_id"]] = svc.db.one("SELECT * FROM tasks WHERE id = ?", (r["task_id"],))
    items = [subtask_item(svc, r, flows[r["dataflow_id"]], tasks[r["task_id"]]) for r in rows]
    return {"DataFlowSubTask": {"DataFlowSubTask": items}, "NextToken": token}


@action(CancelDataFlowSubTaskRequest)
def CancelDataFlowSubTask(svc: Any, req: CancelDataFlowSubTaskRequest) -> dict[str, Any]:
    """Cancel a CREATED or RUNNING subtask (a running copy stops and leaves no partial file)."""
    flow = flow_of(svc, req.FileSystemId, req.DataFlowId)
    row = svc.db.one("SELECT * FROM subtasks WHERE id = ? AND task_id = ? AND dataflow_id = ?",
                     (req.DataFlowSubTaskId, req.DataFlowTaskId, flow["id"]))
    if row is None:
        raise ApiError("InvalidSubTask.NotFound", f"no subtask {req.DataFlowSubTaskId!r} in task {req.DataFlowTaskId!r}")
    if row["status"] not in ("CREATED", "RUNNING"):
        raise ApiError("InvalidStatus.ResourceMismatch", f"subtask {row['id']} is {row['status']}; only CREATED "
                       "or RUNNING subtasks can be canceled")
    if req.DryRun:
        return {}
    if svc.db.update("subtasks", row["id"], {"status": "CANCELED", "end_time": now()}, "status = 'CREATED'"):
        return {}
    if svc.db.update("subtasks", row["id"], {"status": "CANCELING"}, "status = 'RUNNING'"):
        svc.executor.cancel(row["id"])
        return {}
    row = svc.db.one("SELECT status FROM subtasks WHERE id = ?", (row["id"],))
    raise ApiError("InvalidStatus.ResourceMismatch", f"subtask {req.DataFlowSubTaskId} is "
                   f"{row['status'] if row else 'gone'}")
