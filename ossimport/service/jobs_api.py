"""Jobs actions over the working directory: the job system's own state is the only record.

CreateJob takes the keys of `local_job.cfg` as JSON and goes through the same validation and
messages as `console.sh submit`; answers show source and destination without credentials.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ossimport.errors import UsageError
from ossimport.jobs.config import JOB_KEYS, JobConfig, dump_job, load_job
from ossimport.jobs.store import JobDir
from ossimport.jobs.submit import submit_job
from ossimport.jobs.tracker import job_status
from ossimport.service.api import Common, action, paging
from ossimport.service.errors import CODES, ApiError, invalid

CreateJobRequest = dataclasses.make_dataclass(
    "CreateJobRequest", [(k, Any, dataclasses.field(default=None)) for k in JOB_KEYS], bases=(Common,), kw_only=True)


@dataclass(kw_only=True)
class DescribeJobsRequest(Common):
    MaxResults: int = 0
    NextToken: str = ""


@dataclass(kw_only=True)
class JobRequest(Common):
    JobName: str


@dataclass(kw_only=True)
class DescribeJobRequest(Common):
    JobName: str
    MaxResults: int = 0  # failed files per page
    NextToken: str = ""


def _api_error(exc: UsageError) -> ApiError:
    code = exc.code if exc.code in CODES else "InvalidParameter"
    return ApiError(code, str(exc))


@action(CreateJobRequest, creates=True)
def CreateJob(svc: Any, req: Any) -> dict[str, Any]:
    """Submit a job: the keys of local_job.cfg as JSON (secrets are write-only)."""
    mapping = {k: getattr(req, k) for k in JOB_KEYS if getattr(req, k) is not None}
    try:
        cfg = JobConfig.from_mapping(mapping, "CreateJob", base_dir=svc.sysconf.base_dir,
                                     allow_short_interval=svc.sysconf.allowShortIncrementalInterval)
        submit_job(svc.workdir, cfg, "CreateJob", dry_run=req.DryRun)
    except UsageError as exc:
        if not (exc.code == "Job.AlreadyExists" and req.ClientToken and _frozen(svc, cfg.jobName) == dump_job(cfg)):
            raise _api_error(exc) from None
        # the same job, submitted by this token's first request before a kill kept its answer
        # from being recorded: a retry answers as the first request would have
    if not req.DryRun:
        svc.events.publish("job", {"JobName": cfg.jobName, "State": "SUBMITTED"})
    return {"JobName": cfg.jobName, "Warnings": list(cfg.warnings)}


@action(DescribeJobsRequest)
def DescribeJobs(svc: Any, req: Any) -> dict[str, Any]:
    """Every job with state, counters, throughput, ETA, source and destination."""
    limit = paging(req.MaxResults, 1, 100, 20)
    names = sorted(n for n in _names(svc) if n > req.NextToken)
    page = names[:limit]
    items = [job_item(svc, n) for n in page]
    return {"Jobs": {"Job": items}, "NextToken": page[-1] if len(names) > limit else ""}


@action(DescribeJobRequest)
def DescribeJob(svc: Any, req: Any) -> dict[str, Any]:
    """One job, its throughput history and its failed files with their causes (paged)."""
    name = _existing(svc, req.JobName)
    limit = paging(req.MaxResults, 1, 1000, 100)
    start = int(req.NextToken) if req.NextToken.isdigit() else 0
    failed: list[dict[str, str]] = []
    more = False
    for i, item in enumerate(failed_files(svc.workdir.job(name))):
        if i < start:
            continue
        if len(failed) == limit:
            more = True
            break
        failed.append(item)
    return {"Job": {**job_item(svc, name), "ThroughputHistory": _history(svc, name),
                    "FailedFiles": {"FailedFile": failed}},
            "NextToken": str(start + limit) if more else ""}


@action(JobRequest)
def RetryJob(svc: Any, req: Any) -> dict[str, Any]:
    """Move the job's failed tasks back to pending (only the files that failed), and make sure
    the master and workers run."""
    name = _existing(svc, req.JobName)
    if req.DryRun:
        return {"RetriedTasks": 0}
    job = svc.workdir.job(name)
    moved = job.retry_failed() if job.root.exists() else 0
    svc.workdir.log("ossimport2.log", f"job {name}: {moved} failed tasks moved back to pending (service)")
    svc.workers.start()
    svc.events.publish("job", job_item(svc, name))
    return {"RetriedTasks": moved}


@action(JobRequest)
def StopJob(svc: Any, req: Any) -> dict[str, Any]:
    """Stop the master and workers of the working directory (as `console.sh stop`: every job
    pauses there, and resumes from its checkpoints on RetryJob or `console.sh start`)."""
    _existing(svc, req.JobName)
    if not req.DryRun:
        svc.workers.stop()
    return {}


@action(JobRequest)
def DeleteJob(svc: Any, req: Any) -> dict[str, Any]:
    """Remove the job's state (= `console.sh clean JOB`)."""
    name = _existing(svc, req.JobName)
    if not req.DryRun:
        svc.workdir.clean(name)
        svc.events.publish("job", {"JobName": name, "State": "DELETED"})
    return {}


# ---- reading the working directory ------------------------------------------------------------------
def _names(svc: Any) -> set[str]:
    return {j.name for j in svc.workdir.jobs()} | set(svc.workdir.queued())


def _existing(svc: Any, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,128}", name):
        raise invalid("JobName", "use the job's name: letters, digits, '_' or '-'")
    if name not in _names(svc):
        raise ApiError("InvalidJob.NotFound", f"no job named {name!r}")
    return name


def _config_path(svc: Any, name: str) -> Path:
    job = svc.workdir.job(name)
    return job.config_path if job.root.exists() else svc.workdir.queue / name / "job.cfg"


def _frozen(svc: Any, name: str) -> str:
    try:
        return _config_path(svc, name).read_text(encoding="utf-8")
    except OSError:
        return ""


def _places(svc: Any, name: str) -> tuple[str, str]:
    """Source and destination as the user would write them, credentials masked."""
    try:
        cfg = load_job(_config_path(svc, name), allow_short_interval=True)
        src, dst = cfg.locations()
        return src.display(), dst.display()
    except (UsageError, OSError):
        return "", ""


def job_item(svc: Any, name: str) -> dict[str, Any]:
    job = svc.workdir.job(name)
    src, dst = _places(svc, name)
    if not job.root.exists():
        st: dict[str, Any] = {"JobState": "SUBMITTED"}
    else:
        st = job_status(job)
        try:  # the tracker's rates (the master writes them every few seconds)
            rates = json.loads(job.stat_path.read_text())
            st["Throughput (bytes/s)"], st["ETA (s)"] = rates.get("Throughput (bytes/s)", 0.0), rates.get("ETA (s)")
        except (FileNotFoundError, ValueError):
            pass
    total, done, failed = st.get("Bytes Total", 0), st.get("Bytes Done", 0), st.get("Bytes Failed", 0)
    files_total = st.get("Files Total", 0)
    if total:
        progress = (done + failed) * 10000 // total
    else:
        progress = 10000 if st["JobState"] in ("SUCCEED", "FAILED") else 0
    return {
        "JobName": name, "State": st["JobState"], "Source": src, "Destination": dst,
        "Progress": min(progress, 10000), "ScanFinished": bool(st.get("Is Scan Finished", False)),
        "PendingTasks": st.get("Pending Task Count", 0), "DispatchedTasks": st.get("Dispatched Task Count", 0),
        "SucceedTasks": st.get("Succeed Task Count", 0), "FailedTasks": st.get("Failed Task Count", 0),
        "FilesTotal": files_total, "FilesDone": st.get("Files Done", 0), "FilesFailed": st.get("Files Failed", 0),
        "BytesTotal": total, "BytesDone": done, "BytesFailed": failed,
        "Throughput": st.get("Throughput (bytes/s)", 0.0), "Eta": st.get("ETA (s)"),
    }


def failed_files(job: JobDir) -> Iterator[dict[str, str]]:
    """(key, cause, task) of every failed file, from the failed tasks' audit.log."""
    for task, path in job.tasks("failed_tasks"):
        try:
            lines = (path / "audit.log").read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            kind, _, rest = line.partition("\t")
            if kind == "FAILED":
                key, _, cause = rest.partition("\t")
                yield {"Key": key, "Cause": cause, "Task": task}


_STAT_LINE = re.compile(r"^(\S+ \S+) JobName=(\S+) .*?Bytes Done=(\d+) .*?Throughput \(bytes/s\)=([\d.]+)")


def _history(svc: Any, name: str, points: int = 120) -> list[dict[str, Any]]:
    """The job's throughput as the tracker logged it (logs/job_stat.log), the latest points."""
    path = svc.workdir.logs / "job_stat.log"
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _STAT_LINE.match(line)
                if m and m[2] == name:
                    out.append({"Time": m[1], "BytesDone": int(m[3]), "Throughput": float(m[4])})
                    if len(out) > points * 2:
                        del out[:points]
    except FileNotFoundError:
        pass
    return out[-points:]
