"""Job status: counted from the state directories, so it is exact and survives any crash.

The master's tracker thread calls `job_status` every few seconds, adds throughput and ETA from the
change since the last call and the workers' in-flight progress, writes `STAT.json` and a line to
`logs/job_stat.log`. `console stat` reads the same directories (plus `STAT.json` for the rates).

What a status says:
- JobState: RUNNING (scanning or tasks left), WAITING (incremental, between passes; `Next Pass`
  says when the next one starts), SUCCEED / FAILED (every task finished; FAILED also when the
  source could not be listed: `Scan Error` says why), STOPPED (would be RUNNING or WAITING, but no
  master serves the job), SUBMITTED (queued, not yet taken by a master).
- Files/Bytes Done never go down: files that succeeded before a `retry` re-cut their task are
  counted as done while it runs again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ossimport.jobs.store import STATES, JobDir, WorkDir, atomic_write, read_header

# ossimport's `stat` field names, in its order
STAT_FIELDS = ("JobName", "JobState", "Pending Task Count", "Dispatched Task Count", "Succeed Task Count",
               "Failed Task Count", "Is Scan Finished")
_FINISHED = ("succeed_tasks", "failed_tasks")


@dataclass(frozen=True, slots=True)
class TaskCount:
    """What one task adds to its job's totals."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    files_failed: int = 0
    bytes_failed: int = 0


def count_task(state: str, path: Path) -> TaskCount:
    try:  # the totals come from the task manifests: exact whatever crashed when
        header = read_header(path / "TASK")
    except (FileNotFoundError, ValueError, KeyError):
        return TaskCount()
    files_total = header.count + header.carried_files
    bytes_total = header.bytes + header.carried_bytes
    if state not in _FINISHED:
        # what already succeeded before a `retry` cut the task down stays done while it runs again
        return TaskCount(files_total, bytes_total, header.carried_files, header.carried_bytes)
    try:
        done = json.loads((path / "DONE").read_text())
    except (FileNotFoundError, ValueError):
        return TaskCount(files_total, bytes_total)
    failed, failed_bytes = int(done.get("failed", 0)), int(done.get("failed_bytes", 0))
    return TaskCount(files_total, bytes_total, int(done.get("files", 0)) - failed,
                     int(done.get("bytes", 0)) - failed_bytes, failed, failed_bytes)


class TaskCounts:
    """`count_task` with memory: a task directory is read again only when it changed (its mtime
    moves whenever a file in it is written or removed: `finish`, `retry`) or moved to another state
    (a new path). So a tick over a large job reads only the tasks that are new or changed."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, TaskCount]] = {}

    def count(self, state: str, path: Path) -> TaskCount:
        try:
            stamp = os.stat(path).st_mtime_ns
        except FileNotFoundError:  # moved on while we looked: the next tick counts it there
            return TaskCount()
        known = self._known.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        counted = count_task(state, path)
        self._known[path] = (stamp, counted)
        return counted

    def forget_except(self, seen: set[Path]) -> None:
        for path in [p for p in self._known if p not in seen]:
            del self._known[path]


def _task_paths(job: JobDir, state: str) -> list[Path]:
    """A state's task directories; a worker's directory may vanish while we list (its last task left)."""
    base = job.root / state
    try:
        if state != "dispatched":
            return [base / n for n in os.listdir(base)]
        out = []
        for worker in os.listdir(base):
            try:
                out.extend(base / worker / n for n in os.listdir(base / worker))
            except FileNotFoundError:
                continue
        return out
    except FileNotFoundError:
        return []


def _is_incremental(job: JobDir) -> bool:
    from ossimport.jobs.config import read_properties

    try:
        frozen = read_properties(job.config_path.read_text(encoding="utf-8"), str(job.config_path))
    except (FileNotFoundError, PermissionError):
        return False
    return frozen.get("isIncremental", "").strip().lower() == "true"


def _stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def empty_status(name: str, state: str) -> dict[str, Any]:
    """Every field a status has (one shape for `stat --json`), with nothing counted yet."""
    return {"JobName": name, "JobState": state, "Pending Task Count": 0, "Dispatched Task Count": 0,
            "Succeed Task Count": 0, "Failed Task Count": 0, "Is Scan Finished": False, "Pass": 1,
            "Files Total": 0, "Bytes Total": 0, "Files Done": 0, "Bytes Done": 0, "Files Failed": 0,
            "Bytes Failed": 0, "Throughput (bytes/s)": 0.0, "ETA (s)": None, "Next Pass": None,
            "Scan Error": None}


def job_status(job: JobDir, counts: TaskCounts | None = None, *, served: bool = True) -> dict[str, Any]:
    """The job's status from its directories. `served`: a master is running for it (when not,
    a job that is not finished is STOPPED). `counts` caches what was read before."""
    tasks: dict[str, int] = {}
    total = [0] * 6
    seen: set[Path] = set()
    for state in STATES:
        paths = _task_paths(job, state)
        tasks[state] = len(paths)
        for path in paths:
            seen.add(path)
            c = counts.count(state, path) if counts is not None else count_task(state, path)
            for i, v in enumerate((c.files_total, c.bytes_total, c.files_done, c.bytes_done, c.files_failed,
                                   c.bytes_failed)):
                total[i] += v
    if counts is not None:
        counts.forget_except(seen)
    cp = job.read_checkpoint()
    scan_done = bool(cp.get("done"))
    busy = tasks["pending_tasks"] + tasks["dispatched"]
    not_before = float(cp.get("not_before", 0) or 0)
    next_pass = None
    if cp.get("scan_error") and not scan_done and not busy:
        state = "FAILED"  # the source could not be listed; `retry` scans again
    elif not scan_done and not_before > time.time() and not busy:
        state, next_pass = "WAITING", _stamp(not_before)  # incremental: between two passes
    elif not scan_done or busy:
        state = "RUNNING"
    elif _is_incremental(job):
        state = "WAITING"  # the pass just ended; the master is about to schedule the next one
    else:
        state = "FAILED" if tasks["failed_tasks"] else "SUCCEED"
    if not served and state in ("RUNNING", "WAITING"):
        state, next_pass = "STOPPED", None
    st = empty_status(job.name, state)
    st.update({
        "Pending Task Count": tasks["pending_tasks"],
        "Dispatched Task Count": tasks["dispatched"],
        "Succeed Task Count": tasks["succeed_tasks"],
        "Failed Task Count": tasks["failed_tasks"],
        "Is Scan Finished": scan_done,
        "Pass": int(cp.get("pass", 1)),
        "Files Total": total[0],
        "Bytes Total": total[1],
        "Files Done": total[2],
        "Bytes Done": total[3],
        "Files Failed": total[4],
        "Bytes Failed": total[5],
        "Next Pass": next_pass,
        "Scan Error": cp.get("scan_error") or None,
    })
    return st


class Tracker:
    """Adds rates to `job_status` and records them, on a thread of its own in the master process
    (counting never holds up dispatch)."""

    def __init__(self, workdir: WorkDir) -> None:
        self.workdir = workdir
        self._last: dict[str, tuple[float, int]] = {}
        self._counts: dict[str, TaskCounts] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, inflight: Callable[[], dict[str, tuple[int, int]]], interval: float) -> None:
        """Tick every `interval` seconds until `stop()`; `inflight()` is asked at each tick."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.tick(inflight())
                except Exception as exc:  # a status not written this time is written next time
                    self.workdir.log("ossimport2.log", f"tracker: {type(exc).__name__}: {exc}")
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="tracker", daemon=True)
        self._thread.start()

    def stop(self, inflight: dict[str, tuple[int, int]] | None = None) -> None:
        """Stop the thread, then record a last status."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.tick(inflight)

    def tick(self, inflight: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """inflight: job -> (files, bytes) done so far in tasks still running."""
        out = []
        now = time.monotonic()
        jobs = [job for job in self.workdir.jobs() if job.root.exists()]
        for gone in set(self._counts) - {job.name for job in jobs}:
            del self._counts[gone]
        for job in jobs:
            st = job_status(job, self._counts.setdefault(job.name, TaskCounts()))
            fl, by = (inflight or {}).get(job.name, (0, 0))
            st["Files Done"] += fl
            st["Bytes Done"] += by
            prev = self._last.get(job.name)
            rate = 0.0
            if prev is not None and now > prev[0]:
                rate = max(0.0, (st["Bytes Done"] - prev[1]) / (now - prev[0]))
            self._last[job.name] = (now, st["Bytes Done"])
            st["Throughput (bytes/s)"] = round(rate, 1)
            remaining = max(0, st["Bytes Total"] - st["Bytes Done"] - st["Bytes Failed"])
            st["ETA (s)"] = round(remaining / rate) if rate > 0 and st["JobState"] == "RUNNING" else None
            st["Updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            try:
                atomic_write(job.stat_path, json.dumps(st))
            except FileNotFoundError:  # cleaned while we counted
                continue
            self.workdir.log("job_stat.log", " ".join(f"{k}={v}" for k, v in st.items() if k != "Updated"))
            out.append(st)
        return out
