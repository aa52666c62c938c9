"""The master: takes submitted jobs, scans sources into tasks, leases tasks to workers.

- Scanning (jobs/scanner.py) cuts the source listing into tasks by count and size, in parallel
  key ranges, each checkpointed, so a scan killed at any instant resumes without losing or
  duplicating a task.
- Dispatch: a ROUTER socket; a dispatched task is leased to a worker and the lease is renewed by
  its heartbeats; a lapsed lease (worker killed, host gone) returns the task to pending. After a
  master restart every dispatched task gets a fresh lease, so live workers keep their work.
- Fencing: every dispatch has a lease id; heartbeats, releases and results carry it, and only the
  current holder's word counts. A worker whose lease lapsed and was handed on is told to drop the
  task; its late result is acknowledged and ignored (logged), whether it says ok or failed. The one
  exception: a lapsed task still waiting in pending takes an ok result of its last lease (the work
  is done; nobody else holds it). Lease ids are kept in the task's LEASE file, so a master
  restart keeps live workers' work.
- A job's identity is its submission (JOB_ID): a job cleaned and submitted again under the same
  name gets new task names, and the master drops what it held of the old one.
- A result is recorded once: a duplicate (the task already finished) is acknowledged and ignored.
- Incremental jobs start a new pass `incrementalModeInterval` seconds after the last one ended;
  later passes (and isSkipExistFile) compare with the destination and cut tasks only of files
  that are missing or changed there.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ossimport.engine.transfer import TransferOptions
from ossimport.jobs.protocol import ProtocolError, pack, unpack
from ossimport.jobs.scanner import JobPlan, Scanner
from ossimport.jobs.security import CurveServer
from ossimport.jobs.store import JobDir, WorkDir, atomic_write, read_header
from ossimport.jobs.stream_broker import StreamBroker
from ossimport.jobs.tracker import Tracker
from ossimport.retry import with_retries

log = logging.getLogger("ossimport.master")


@dataclass
class Lease:
    job: str
    worker: str
    path: Path
    deadline: float
    id: str


@dataclass
class ActiveJob:
    dir: JobDir
    plan: JobPlan
    id: str
    pending: deque[str] = field(default_factory=deque)
    scanner: threading.Thread | None = None
    scan_error: str = ""


class Master:
    def __init__(self, workdir: WorkDir, address: str, load_plan: Any, *, lease: float = 60.0,
                 stat_interval: float = 10.0, curve_keys: Path | None = None) -> None:
        """`load_plan(config_path) -> JobPlan` reads a frozen job config (kept as a callable so
        this module does not depend on the config reader's details)."""
        self.workdir = workdir
        self.address = address
        self.load_plan = load_plan
        self.lease = lease
        self.stat_interval = stat_interval
        self.curve_keys = curve_keys
        self.jobs: dict[str, ActiveJob] = {}
        self.leases: dict[str, Lease] = {}  # task -> lease
        self.lapsed: dict[str, str] = {}  # task back in pending -> the id of its lapsed lease
        self.progress: dict[str, tuple[str, int, int]] = {}  # task -> (job, files, bytes) in flight
        self.tracker = Tracker(workdir)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()  # guards `pending` deques shared with scanner threads

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.workdir.create()
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        auth = None
        try:
            if self.curve_keys is None:  # loopback too: any local user can reach a loopback port
                raise ProtocolError("the master needs CURVE keys (curveKeysDir): every worker must authenticate")
            auth = CurveServer(self.curve_keys).start(ctx, sock)
            sock.bind(self.address)
        except BaseException:
            sock.close()
            if auth is not None:
                auth.stop()
            raise
        self.workdir.log("ossimport2.log", f"master listening on {self.address}")
        self.tracker.start(self._inflight, self.stat_interval)
        self.streams = StreamBroker(self.lease, lambda ident, kind, **body: sock.send_multipart([ident, pack(kind, **body)]))
        next_tick = 0.0
        try:
            while not self.stop_event.is_set():
                if sock.poll(100):
                    parts = sock.recv_multipart()
                    if len(parts) >= 2:
                        try:
                            self._handle(sock, parts[0], parts[1])
                        except Exception as exc:  # one bad message must not stop the master
                            log.warning("ignoring a message that could not be handled: %r", exc)
                now = time.monotonic()
                if now >= next_tick:
                    self.streams.expire()
                    self._housekeeping()
                    next_tick = now + 0.5
        finally:
            self.tracker.stop(self._inflight())
            sock.close()
            if auth is not None:
                auth.stop()

    def _inflight(self) -> dict[str, tuple[int, int]]:
        """job -> (files, bytes) done in tasks still running; asked from the tracker's thread."""
        inflight: dict[str, tuple[int, int]] = {}
        for job, files, size in list(self.progress.values()):  # one C-level copy: safe beside dispatch
            f0, b0 = inflight.get(job, (0, 0))
            inflight[job] = (f0 + files, b0 + size)
        return inflight

    # ---- jobs ---------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        # first forget jobs that were cleaned (or cleaned and submitted again: another identity),
        # so a job taken from the queue below is never run with what was held of its predecessor
        for name in list(self.jobs):
            job = self.jobs[name]
            if not job.dir.root.exists() or job.dir.read_id() != job.id:
                self._forget(name)
        for name in self.workdir.queued():
            if name.startswith("."):
                continue
            if self.workdir.job(name).root.exists():
                log.error("job %s is queued but already exists; clean it first", name)
                continue
            self.workdir.take(name)
            self.workdir.log("ossimport2.log", f"job {name} taken from the queue")
        for jdir in self.workdir.jobs():
            if jdir.name.startswith(".") or jdir.name in self.jobs:
                continue
            self._adopt(jdir)
        for job in list(self.jobs.values()):
            self._maybe_scan(job)
            self._maybe_next_pass(job)
        self._expire_leases()

    def _forget(self, name: str) -> None:
        """A job was cleaned: its leases go (its workers are told to drop at their next beat)."""
        self.jobs.pop(name)
        for task in [t for t, lease in self.leases.items() if lease.job == name]:
            self.leases.pop(task)
            self.progress.pop(task, None)
        self.workdir.log("ossimport2.log", f"job {name} was cleaned: its tasks are dropped")

    def _adopt(self, jdir: JobDir) -> None:
        try:
            plan = self.load_plan(jdir.config_path)
        except Exception as exc:  # a broken frozen config stops that job, not the master
            log.error("job %s cannot be loaded: %s", jdir.name, exc)
            self.workdir.log("ossimport2.log", f"job {jdir.name} cannot be loaded: {exc}")
            return
        jdir.create()
        jdir.sweep_tmp()
        job = ActiveJob(jdir, plan, jdir.read_id())
        now = time.monotonic()
        for name, path in jdir.tasks("dispatched"):
            # the lease as dispatched: a live worker renews it with its next heartbeat, a dead one
            # lets it lapse (no LEASE file: killed before the task was sent, nobody holds it)
            try:
                lease_id = (path / "LEASE").read_text().strip()
            except FileNotFoundError:
                lease_id = ""
            self.leases[name] = Lease(jdir.name, path.parent.name, path, now + (self.lease if lease_id else 0),
                                      lease_id)
        job.pending.extend(name for name, _ in jdir.tasks("pending_tasks"))
        self.jobs[jdir.name] = job
        self.workdir.log("ossimport2.log", f"job {jdir.name} active")

    def _maybe_scan(self, job: ActiveJob) -> None:
        if job.scanner is not None and job.scanner.is_alive():
            return
        cp = job.dir.read_checkpoint()
        if job.scan_error and cp.get("scan_error"):
            return  # gave up: FAILED until `retry` clears the error (a restarted master tries again)
        if cp.get("done") or cp.get("not_before", 0) > time.time():
            if not job.pending and job.dir.count("pending_tasks"):  # e.g. after `retry`
                with self._lock:
                    job.pending.extend(n for n, _ in job.dir.tasks("pending_tasks"))
            return
        job.scanner = threading.Thread(target=self._scan, args=(job,), name=f"scan-{job.dir.name}", daemon=True)
        job.scanner.start()

    def _maybe_next_pass(self, job: ActiveJob) -> None:
        if not job.plan.incremental:
            return
        cp = job.dir.read_checkpoint()
        if not cp.get("done") or job.pending or any(lease.job == job.dir.name for lease in self.leases.values()):
            return
        if job.dir.count("pending_tasks") or job.dir.count("dispatched"):
            return
        cp = job.dir.next_pass(time.time() + job.plan.interval)
        self.workdir.log("ossimport2.log", f"job {job.dir.name}: pass {cp['pass'] - 1} done; next scan in "
                         f"{job.plan.interval:.0f}s")

    # ---- scanning -----------------------------------------------------------------------------------
    def _scan(self, job: ActiveJob) -> None:
        """Scan with the copy's retry policy (retryable errors, a bounded number of times); when the
        source cannot be listed, record why in the checkpoint: the job is FAILED with that cause until
        `retry` clears it (or a master restart tries again)."""
        name = job.dir.name

        def queue_task(task: str) -> None:
            with self._lock:
                job.pending.append(task)

        attempts = 0

        def scan_once() -> None:
            nonlocal attempts
            attempts += 1
            Scanner(job.dir, job.plan, queue_task,
                    stopped=lambda: self.stop_event.is_set() or not job.dir.root.exists(),
                    log=lambda msg: self.workdir.log("ossimport2.log", f"job {name}: {msg}")).run()

        job.scan_error = ""
        try:
            job.dir.set_scan_error(None)  # a new round of attempts
            with_retries(scan_once, attempts=TransferOptions().attempts, what=f"the scan of job {name}")
        except Exception as exc:
            cause = f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"
            tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
            log.error("scan of job %s failed after %s: %s", name, tries, cause)
            self.workdir.log("ossimport2.log", f"job {name}: scan failed after {tries}: {cause}")
            if job.dir.root.exists():  # not cleaned meanwhile
                job.dir.set_scan_error(cause)
                job.scan_error = cause

    # ---- dispatch -------------------------------------------------------------------------------------
    def _handle(self, sock: zmq.Socket, ident: bytes, frame: bytes) -> None:
        try:
            msg = unpack(frame)
        except ProtocolError as exc:
            log.warning("ignoring a message: %s", exc)
            return
        worker = ident.decode(errors="replace")
        kind = msg["type"]
        if self.streams.handle(ident, kind, msg):
            return  # a streaming subtask's word (stream_broker.py)
        if kind == "want":
            self._offer(sock, ident, worker)
        elif kind == "beat":
            self._beat(sock, ident, worker, msg)
        elif kind == "result":
            self._result(sock, ident, worker, msg)
        elif kind == "release":  # offered while busy: back to the front of the queue
            lease = self.leases.get(msg.get("task", ""))
            if lease is not None and lease.worker == worker and lease.id == msg.get("lease"):
                lease.deadline = 0.0
                self._expire_leases()
        elif kind == "hello":
            self.workdir.log("ossimport2.log", f"worker {worker} connected from {msg.get('host')}")

    def _offer(self, sock: zmq.Socket, ident: bytes, worker: str) -> None:
        for job in list(self.jobs.values()):
            while True:
                with self._lock:
                    if not job.pending:
                        break
                    name = job.pending.popleft()
                try:
                    path = job.dir.dispatch(name, worker)
                except FileNotFoundError:
                    continue  # gone meanwhile (retry, clean, a stale queue entry)
                lease_id = secrets.token_hex(8)
                # kept beside the task so that a master restart recognises the holder's beats
                atomic_write(path / "LEASE", lease_id, durable=False)
                self.leases[name] = Lease(job.dir.name, worker, path, time.monotonic() + self.lease, lease_id)
                self.lapsed.pop(name, None)
                manifest = (path / "TASK").read_text(encoding="utf-8")
                sock.send_multipart([ident, pack("task", job=job.dir.name, task=name, lease=lease_id,
                                                 manifest=manifest, spec=job.plan.spec.to_dict())])
                return
        sock.send_multipart([ident, pack("idle", wait=1.0)])

    def _holds(self, task: str, worker: str, lease_id: Any) -> Lease | None:
        """The lease of `task` if `worker` holds it under `lease_id` now, else None."""
        lease = self.leases.get(task)
        if lease is None or lease.worker != worker or not lease.id or lease.id != lease_id:
            return None
        return lease

    def _beat(self, sock: zmq.Socket, ident: bytes, worker: str, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        leases = msg.get("leases", {})
        for task in msg.get("tasks", []):
            lease = self._holds(task, worker, leases.get(task))
            if lease is not None:
                lease.deadline = now + self.lease
                files, size = msg.get("progress", {}).get(task, [0, 0])
                self.progress[task] = (lease.job, int(files), int(size))
            else:  # lapsed and handed on, or the job was cleaned: tell the worker to let go
                sock.send_multipart([ident, pack("drop", task=task)])

    def _result(self, sock: zmq.Socket, ident: bytes, worker: str, msg: dict[str, Any]) -> None:
        task, job_name, lease_id = msg["task"], msg["job"], msg.get("lease")
        job = self.jobs.get(job_name)
        lease = self._holds(task, worker, lease_id)
        path: Path | None = None
        if job is not None and lease is not None and lease.job == job_name and lease.path.exists():
            path = lease.path
            self.leases.pop(task)
        elif (job is not None and msg.get("ok") and lease_id and self.lapsed.get(task) == lease_id
              and task not in self.leases):
            # the lease lapsed and nobody took the task since: the work is done, take it
            path = job.dir.locate(task)
            if path is None or path.parent.name != "pending_tasks":
                path = None
            else:
                with self._lock:
                    if task in job.pending:
                        job.pending.remove(task)
        if path is None:
            # a duplicate (counted once), a job cleaned meanwhile, or a worker that no longer holds
            # the task: whoever holds it now reports
            self.workdir.log("ossimport2.log", f"result of task {task} from {worker} ignored: "
                             "its lease is not the task's current lease")
            sock.send_multipart([ident, pack("ack", task=task)])
            return
        self.progress.pop(task, None)
        self.lapsed.pop(task, None)
        assert job is not None
        done = dict(msg.get("done", {}))
        header = read_header(path / "TASK")
        done["files"] = int(done.get("files", 0)) + header.carried_files
        done["bytes"] = int(done.get("bytes", 0)) + header.carried_bytes
        done["worker"] = worker
        done["finished"] = time.time()
        job.dir.finish(path, bool(msg.get("ok")), done, list(msg.get("audit", [])), list(msg.get("errors", [])))
        sock.send_multipart([ident, pack("ack", task=task)])

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for task, lease in list(self.leases.items()):
            if lease.deadline > now:
                continue
            self.leases.pop(task, None)
            self.progress.pop(task, None)
            job = self.jobs.get(lease.job)
            if job is None or not lease.path.exists():
                continue
            job.dir.return_to_pending(lease.path)
            if lease.id:
                self.lapsed[task] = lease.id
            with self._lock:
                job.pending.appendleft(task)
            self.workdir.log("ossimport2.log", f"lease of task {task} by {lease.worker} lapsed: back to pending")
