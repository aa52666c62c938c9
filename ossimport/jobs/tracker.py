"""Job status: counted from the state directories, so it is exact and survives any crash.

The master's tracker thread calls `job_status` every few seconds, adds throughput and ETA from the
change since the last call and the workers' in-flight progress, writes `STAT.json` and a line to
`logs/job_stat.log`. `console stat` reads the same directories (plus `STAT.json` for the rates).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ossimport.jobs.store import JobDir, WorkDir, atomic_write, read_header

# ossimport's `stat` field names, in its order
STAT_FIELDS = ("JobName", "JobState", "Pending Task Count", "Dispatched Task Count", "Succeed Task Count",
               "Failed Task Count", "Is Scan Finished")


def job_status(job: JobDir) -> dict[str, Any]:
    counts = {state: 0 for state in ("pending_tasks", "dispatched", "succeed_tasks", "failed_tasks")}
    files_done = bytes_done = files_failed = bytes_failed = 0
    files_total = bytes_total = 0
    for state in counts:
        for _, path in job.tasks(state):
            counts[state] += 1
            done: dict[str, Any] | None = None
            if state in ("succeed_tasks", "failed_tasks"):
                try:
                    done = json.loads((path / "DONE").read_text())
                except (FileNotFoundError, ValueError):
                    done = None
            try:  # the totals come from the task manifests: exact whatever crashed when
                header = read_header(path / "TASK")
                files_total += header.count + header.carried_files
                bytes_total += header.bytes + header.carried_bytes
            except (FileNotFoundError, ValueError, KeyError):
                pass
            if state in ("succeed_tasks", "failed_tasks"):
                if done is None:
                    continue
                failed = int(done.get("failed", 0))
                files_failed += failed
                bytes_failed += int(done.get("failed_bytes", 0))
                files_done += int(done.get("files", 0)) - failed
                bytes_done += int(done.get("bytes", 0)) - int(done.get("failed_bytes", 0))
    cp = job.read_checkpoint()
    scan_done = bool(cp.get("done"))
    busy = counts["pending_tasks"] + counts["dispatched"]
    if not scan_done and cp.get("not_before", 0) > time.time() and not busy:
        state = "WAITING"  # incremental: between two passes
    elif not scan_done or busy:
        state = "RUNNING"
    else:
        state = "FAILED" if counts["failed_tasks"] else "SUCCEED"
    return {
        "JobName": job.name,
        "JobState": state,
        "Pending Task Count": counts["pending_tasks"],
        "Dispatched Task Count": counts["dispatched"],
        "Succeed Task Count": counts["succeed_tasks"],
        "Failed Task Count": counts["failed_tasks"],
        "Is Scan Finished": scan_done,
        "Pass": int(cp.get("pass", 1)),
        "Files Total": files_total,
        "Bytes Total": bytes_total,
        "Files Done": files_done,
        "Bytes Done": bytes_done,
        "Files Failed": files_failed,
        "Bytes Failed": bytes_failed,
    }


class Tracker:
    """Adds rates to `job_status` and records them; owned by the master process."""

    def __init__(self, workdir: WorkDir) -> None:
        self.workdir = workdir
        self._last: dict[str, tuple[float, int]] = {}

    def tick(self, inflight: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """inflight: job -> (files, bytes) done so far in tasks still running."""
        out = []
        now = time.monotonic()
        for job in self.workdir.jobs():
            if not job.root.exists():
                continue
            st = job_status(job)
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
