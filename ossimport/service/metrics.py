"""`GET /metrics` in the Prometheus text format (prometheus-client).

Job counters are read from the job system's state at scrape time (the same counting as `stat`),
subtask counts from the database; request latency is observed as requests finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ossimport.jobs.tracker import job_status

SUBTASK_STATUSES = ("CREATED", "RUNNING", "COMPLETE", "FAILED", "CANCELING", "CANCELED", "EXPIRED")


class _State(Collector):
    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        svc = self.service
        files = CounterMetricFamily("ossimport_job_files", "Files of a job by outcome", labels=["job", "outcome"])
        size = CounterMetricFamily("ossimport_job_bytes", "Bytes of a job by outcome", labels=["job", "outcome"])
        tasks = GaugeMetricFamily("ossimport_job_tasks", "Tasks of a job by state", labels=["job", "state"])
        queue = 0
        for job in svc.workdir.jobs():
            try:
                st = job_status(job)
            except OSError:  # cleaned while we counted
                continue
            files.add_metric([job.name, "copied"], st["Files Done"])
            files.add_metric([job.name, "failed"], st["Files Failed"])
            size.add_metric([job.name, "copied"], st["Bytes Done"])
            size.add_metric([job.name, "failed"], st["Bytes Failed"])
            for state, key in (("pending", "Pending Task Count"), ("dispatched", "Dispatched Task Count"),
                               ("succeed", "Succeed Task Count"), ("failed", "Failed Task Count")):
                tasks.add_metric([job.name, state], st[key])
            queue += st["Pending Task Count"]
        yield files
        yield size
        yield tasks
        subtasks = GaugeMetricFamily("ossimport_subtasks", "Dataflow subtasks by status", labels=["status"])
        counts = {r["status"]: r["n"] for r in svc.db.all("SELECT status, COUNT(*) AS n FROM subtasks GROUP BY status")}
        for status in SUBTASK_STATUSES:
            subtasks.add_metric([status], counts.get(status, 0))
        yield subtasks
        sub_bytes = CounterMetricFamily("ossimport_subtask_bytes", "Bytes that arrived for completed subtasks")
        row = svc.db.one("SELECT COALESCE(SUM(actual_bytes), 0) AS n FROM subtasks WHERE status = 'COMPLETE'")
        sub_bytes.add_metric([], row["n"] if row else 0)
        yield sub_bytes
        depth = GaugeMetricFamily("ossimport_queue_depth", "Pending job tasks plus subtasks waiting to run",
                                  labels=["kind"])
        depth.add_metric(["job_tasks"], queue)
        depth.add_metric(["subtasks"], counts.get("CREATED", 0))
        yield depth
        workers = GaugeMetricFamily("ossimport_workers", "Workers: connected to the job master, busy with a job "
                                    "task, and the service's own subtask threads copying now", labels=["kind"])
        busy = {w for job in svc.workdir.jobs() for w in _dispatched_workers(job.root)}
        workers.add_metric(["connected"], svc.executor.link.workers)
        workers.add_metric(["job"], len(busy))
        workers.add_metric(["in_process"], svc.executor.in_process)
        yield workers
        started = CounterMetricFamily("ossimport_subtasks_started", "Subtasks started, by where they ran: on the "
                                      "job system's workers, or in the service when none was connected",
                                      labels=["runner"])
        for runner, n in svc.executor.started.items():
            started.add_metric([runner], n)
        yield started
        listeners = GaugeMetricFamily("ossimport_event_listeners", "Open /api/events streams")
        listeners.add_metric([], svc.events.listeners)
        yield listeners


def _dispatched_workers(root: Any) -> list[str]:
    try:
        return [p.name for p in (root / "dispatched").iterdir()]
    except OSError:
        return []


class Metrics:
    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_State(service))
        self.latency = Histogram("ossimport_request_duration_seconds", "HTTP request latency",
                                 ["door", "status"], registry=self.registry)

    def request(self, door: str, status: int, seconds: float) -> None:
        self.latency.labels(door, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
