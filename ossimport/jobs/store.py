"""The working directory: the ossimport layout, where every state change is one atomic rename.

    master/jobqueue/<job>/job.cfg                      submitted, not yet taken by the master
    master/jobs/<job>/job.cfg                          the frozen config (0600: it holds secrets)
    master/jobs/<job>/checkpoints/scan.json            how far the source scan got
    master/jobs/<job>/pending_tasks/<task>/TASK
    master/jobs/<job>/dispatched/<worker>/<task>/TASK
    master/jobs/<job>/succeed_tasks/<task>/{TASK,STATUS,DONE,audit.log,error.list}
    master/jobs/<job>/failed_tasks/<task>/{TASK,STATUS,DONE,audit.log,error.list}
    worker/jobs/<job>/tasks/<task>/                    a worker's in-flight copy of a task
    logs/{import,job_stat,ossimport2,submit}.log
    run/*.pid                                          processes started by `console start`

A task is named `<32 hex>_<epoch ms>@<host>`; the hex is derived from (job, pass, seq), so a
task re-cut after a crash is recognised instead of duplicated. Its TASK manifest is one JSON
header line then one `[key, size, mtime]` JSON line per file. A crash at any instant leaves
every task in exactly one state directory (or in `tmp/`, which is swept on start).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ossimport.jobs.crashpoint import crashpoint
from ossimport.storage.base import Entry

STATES = ("pending_tasks", "dispatched", "succeed_tasks", "failed_tasks")


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Write a file so that readers see the old content or the whole new content. `durable`:
    fsync it first (state that must survive a power loss); a lease, say, need not."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)  # state files are few and small: durability is worth the fsync
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the renames into (and out of) a directory survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class TaskHeader:
    job: str
    task: str
    pass_no: int
    seq: int
    count: int
    bytes: int
    first: str
    last: str
    # files (and bytes) of this task that already succeeded before a `retry` cut it down to the
    # ones that failed: still counted as done when the task finishes
    carried_files: int = 0
    carried_bytes: int = 0
    # the last key of the range this task was cut from: where the scan goes on after it, whatever
    # a `retry` later cuts out of the manifest
    upto: str = ""


def task_name(job: str, pass_no: int, seq: int, host: str | None = None, unit: int = 0, job_id: str = "") -> str:
    """The digest is derived from (job, submission, pass, range, number): a task re-cut after a
    crash is recognised, and a task of an earlier submission of the same job name is not."""
    digest = hashlib.md5(f"{job}\x00{job_id}\x00{pass_no}\x00{unit}\x00{seq}".encode()).hexdigest()
    return f"{digest}_{int(time.time() * 1000)}@{host or socket.gethostname()}"


def task_digest(name: str) -> str:
    return name.split("_", 1)[0]


def encode_manifest(header: TaskHeader, entries: Iterable[Entry]) -> str:
    lines = [json.dumps({"job": header.job, "task": header.task, "pass": header.pass_no, "seq": header.seq,
                         "count": header.count, "bytes": header.bytes, "first": header.first,
                         "last": header.last, "carried": [header.carried_files, header.carried_bytes],
                         "upto": header.upto or header.last})]
    lines.extend(json.dumps([e.key, e.size, e.mtime], ensure_ascii=False) for e in entries)
    return "\n".join(lines) + "\n"


def _header(h: dict) -> TaskHeader:
    carried = h.get("carried", [0, 0])
    return TaskHeader(h["job"], h["task"], h["pass"], h["seq"], h["count"], h["bytes"], h["first"], h["last"],
                      carried[0], carried[1], h.get("upto") or h["last"])


def decode_manifest(text: str) -> tuple[TaskHeader, list[Entry]]:
    lines = text.splitlines()
    header = _header(json.loads(lines[0]))
    entries = [Entry(k, s, m) for k, s, m in (json.loads(ln) for ln in lines[1:] if ln)]
    return header, entries


def read_header(path: Path) -> TaskHeader:
    with open(path, encoding="utf-8") as f:
        return _header(json.loads(f.readline()))


class JobDir:
    """One job's state under master/jobs/<job>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = root.name
        self._digests: dict[str, str] | None = None  # task digest -> task name, built on first use

    @property
    def id_path(self) -> Path:
        return self.root / "JOB_ID"

    def read_id(self) -> str:
        """The submission's identity ("" for a job submitted before identities existed): a job
        cleaned and submitted again under the same name is another job."""
        try:
            return self.id_path.read_text().strip()
        except FileNotFoundError:
            return ""

    @property
    def config_path(self) -> Path:
        return self.root / "job.cfg"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoints" / "scan.json"

    @property
    def stat_path(self) -> Path:
        return self.root / "STAT.json"

    def create(self) -> None:
        for d in ("checkpoints", "tmp", *STATES):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def sweep_tmp(self) -> None:
        """Half-written tasks from a crash: they are re-cut from the checkpoint."""
        tmp = self.root / "tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(exist_ok=True)

    # ---- checkpoint -------------------------------------------------------------------------
    def read_checkpoint(self) -> dict:
        """The pass: {"pass", "done", "not_before", "ranges", "scan_error"}; ranges have files of their own."""
        try:
            return json.loads(self.checkpoint_path.read_text())
        except FileNotFoundError:
            return {"pass": 1, "done": False, "not_before": 0.0, "ranges": None}

    def next_pass(self, not_before: float) -> dict:
        """Start a new (incremental) pass. Range files are named by pass, so the old pass's files
        cannot be mistaken for the new one's, whenever a kill comes; they go afterwards."""
        cp = self.read_checkpoint()
        cp = {"pass": cp["pass"] + 1, "done": False, "not_before": not_before, "ranges": None}
        self.write_checkpoint(cp)
        crashpoint("next-pass.checkpoint-written")
        self.sweep_ranges(cp["pass"])
        return cp

    def range_path(self, pass_no: int, i: int) -> Path:
        return self.root / "checkpoints" / f"range-p{pass_no}-{i}.json"

    def sweep_ranges(self, pass_no: int) -> None:
        """Remove the range files of other passes (and of the unnumbered format of old versions)."""
        keep = f"range-p{pass_no}-"
        for old in (self.root / "checkpoints").glob("range-*.json"):
            if not old.name.startswith(keep):
                old.unlink(missing_ok=True)

    def write_checkpoint(self, cp: dict) -> None:
        atomic_write(self.checkpoint_path, json.dumps(cp))

    def set_scan_error(self, error: str | None) -> bool:
        """Record why the source could not be listed (None: clear it, to scan again); True if changed."""
        cp = self.read_checkpoint()
        if (cp.get("scan_error") or None) == error:
            return False
        cp["scan_error"] = error
        self.write_checkpoint(cp)
        return True

    # ---- tasks ------------------------------------------------------------------------------
    def add_task(self, header: TaskHeader, entries: list[Entry]) -> None:
        """Write a new task into pending_tasks in one rename, durably: the scan checkpoint that
        counts it is written after this returns."""
        tmp = self.root / "tmp" / header.task
        tmp.mkdir(parents=True)
        atomic_write(tmp / "TASK", encode_manifest(header, entries))
        os.rename(tmp, self.root / "pending_tasks" / header.task)
        fsync_dir(self.root / "pending_tasks")

    def find(self, digest: str) -> Path | None:
        """The directory of the task whose name starts with `digest`, in whatever state. The
        digest -> name index is built by one walk of the state directories (names never change,
        only the state directory does), so a lookup is O(1); it knows the tasks that existed when
        it was built, so `drop_index` it before cutting new tasks."""
        if self._digests is None:
            self._digests = {task_digest(name): name for state in STATES for name, _ in self.tasks(state)}
        name = self._digests.get(digest)
        return self.locate(name) if name is not None else None

    def drop_index(self) -> None:
        self._digests = None

    def locate(self, name: str) -> Path | None:
        """Where task `name` is now: a few stat calls, one listdir of the workers."""
        for state in ("pending_tasks", "succeed_tasks", "failed_tasks"):
            path = self.root / state / name
            if path.exists():
                return path
        try:
            workers = os.listdir(self.root / "dispatched")
        except FileNotFoundError:
            return None
        for worker in workers:
            path = self.root / "dispatched" / worker / name
            if path.exists():
                return path
        return None

    def tasks(self, state: str) -> Iterator[tuple[str, Path]]:
        """(task name, its directory) in a state; for dispatched, across all workers."""
        base = self.root / state
        if not base.exists():
            return
        if state == "dispatched":
            for worker in sorted(os.listdir(base)):
                for name in sorted(os.listdir(base / worker)):
                    yield name, base / worker / name
        else:
            for name in sorted(os.listdir(base)):
                yield name, base / name

    def count(self, state: str) -> int:
        return sum(1 for _ in self.tasks(state))

    def dispatch(self, name: str, worker: str) -> Path:
        dest = self.root / "dispatched" / worker
        dest.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / "pending_tasks" / name, dest / name)
        return dest / name

    def return_to_pending(self, path: Path) -> None:
        (path / "LEASE").unlink(missing_ok=True)
        os.rename(path, self.root / "pending_tasks" / path.name)
        _rmdir_if_empty(path.parent)

    def finish(self, path: Path, ok: bool, done: dict, audit: list[str], errors: list[str]) -> Path:
        """Record a task's result, then move it to succeed_tasks or failed_tasks in one rename."""
        atomic_write(path / "audit.log", "".join(line + "\n" for line in audit))
        atomic_write(path / "error.list", "".join(key + "\n" for key in errors))
        atomic_write(path / "STATUS", "Completed\n" if ok else "Failed\n")
        atomic_write(path / "DONE", json.dumps(done))
        (path / "LEASE").unlink(missing_ok=True)  # a finished task is held by nobody
        target = self.root / ("succeed_tasks" if ok else "failed_tasks") / path.name
        os.rename(path, target)
        if path.parent.parent.name == "dispatched":
            _rmdir_if_empty(path.parent)
        return target

    def retry_failed(self) -> int:
        """Move failed tasks back to pending with a manifest of just the files that failed.

        Restartable: the manifest is cut first (cutting it again with the same error.list changes
        nothing), then one rename makes the task pending; the old result files go only after
        that, and a pending task's result files are never read."""
        moved = 0
        for name, path in list(self.tasks("failed_tasks")):
            header, entries = decode_manifest((path / "TASK").read_text(encoding="utf-8"))
            try:
                failed = set((path / "error.list").read_text(encoding="utf-8").splitlines())
            except FileNotFoundError:  # a result recorded by an old version without one
                failed = set()
            keep = [e for e in entries if e.key in failed] or entries
            if len(keep) != len(entries):
                header.carried_files += header.count - len(keep)
                header.carried_bytes += header.bytes - sum(e.size for e in keep)
                header.count, header.bytes = len(keep), sum(e.size for e in keep)
                header.first, header.last = keep[0].key, keep[-1].key
                atomic_write(path / "TASK", encode_manifest(header, keep))
            crashpoint("retry.manifest-cut")
            target = self.root / "pending_tasks" / name
            os.rename(path, target)
            for leftover in ("STATUS", "DONE", "audit.log", "error.list", "LEASE"):
                (target / leftover).unlink(missing_ok=True)  # gone already if dispatched meanwhile
            moved += 1
        return moved


def _rmdir_if_empty(path: Path) -> None:
    """A worker's dispatched/<worker> directory goes when its last task leaves."""
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, or already gone


class WorkDir:
    """The whole working directory (sys.properties workingDir)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def create(self) -> None:
        for d in ("master/jobqueue", "master/jobs", "worker/jobs", "logs", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    @property
    def queue(self) -> Path:
        return self.root / "master" / "jobqueue"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def job(self, name: str) -> JobDir:
        return JobDir(self.root / "master" / "jobs" / name)

    def jobs(self) -> list[JobDir]:
        base = self.root / "master" / "jobs"
        return [JobDir(base / n) for n in sorted(os.listdir(base))] if base.exists() else []

    def queued(self) -> list[str]:
        return sorted(os.listdir(self.queue)) if self.queue.exists() else []

    def submit(self, name: str, config_text: str) -> str:
        """Queue a job: its frozen config and a fresh identity appear under jobqueue/<job> in one
        rename. Returns the identity."""
        tmp = self.queue / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        atomic_write(tmp / "job.cfg", config_text, mode=0o600)
        job_id = secrets.token_hex(8)
        atomic_write(tmp / "JOB_ID", job_id + "\n")
        os.rename(tmp, self.queue / name)
        fsync_dir(self.queue)
        return job_id

    def take(self, name: str) -> JobDir:
        """Move a queued job into master/jobs (the master's first step with a new job)."""
        job = self.job(name)
        job.root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.queue / name, job.root)
        job.create()
        return job

    def exists(self, name: str) -> bool:
        return (self.queue / name).exists() or self.job(name).root.exists()

    def clean(self, name: str) -> bool:
        """Remove a job's state (first out of sight by a rename, then from disk). Idempotent: what
        an interrupted clean left in the trash goes first."""
        found = False
        trash = self.root / "master" / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        for left in os.listdir(trash):
            shutil.rmtree(trash / left, ignore_errors=True)
        for path in (self.queue / name, self.job(name).root, self.root / "worker" / "jobs" / name):
            if path.exists():
                found = True
                target = trash / f"{name}.{time.time_ns()}"
                os.rename(path, target)
                shutil.rmtree(target, ignore_errors=True)
        return found

    def log(self, name: str, line: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / name, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
