"""Running dataflow subtasks: one file each, through the engine's Runner (the one copy path), on
a pool of threads in the service process.

A subtask row goes CREATED -> RUNNING -> COMPLETE | FAILED | CANCELED (CANCELING while a running
copy stops). RUNNING is written before the first byte moves and COMPLETE only after the engine
verified the copy, so a kill -9 can leave RUNNING but never COMPLETE without its bytes. On the
next start `recover` puts such a subtask back to CREATED (copies are atomic at the destination,
so running it again is safe), or marks it FAILED with the reason after MAX_ATTEMPTS starts.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ossimport.address import parse_address
from ossimport.engine.outcome import Kind, Outcome
from ossimport.engine.policy import Policy
from ossimport.engine.runner import Runner, RunOptions
from ossimport.engine.stats import Stats
from ossimport.engine.transfer import TransferOptions
from ossimport.errors import NotFound, OssimportError
from ossimport.service import paths
from ossimport.service.arrival import Arrival, Arriving
from ossimport.storage import open_storage
from ossimport.storage.base import Entry, Storage, StorageOptions

log = logging.getLogger("ossimport.service")
MiB = 1024 * 1024
MAX_ATTEMPTS = 3  # service starts a subtask may see RUNNING before it is failed instead of resumed
THREADS = 4  # subtasks copying at once
# parts small enough that Progress moves while a large file travels, large enough to stay cheap
TRANSFER = dict(multipart_threshold=16 * MiB, part_size=8 * MiB, part_threads=4)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


class Executor:
    """Runs CREATED subtasks of running dataflows, oldest first. The database is the queue: a
    feeder thread hands at most THREADS * 2 of them to the pool at a time, so memory stays flat
    however many subtasks wait; `wake()` after a change makes it look at once."""

    def __init__(self, service: Any) -> None:
        self.svc = service
        self.db = service.db
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="subtask")
        self._running: dict[str, tuple[Arrival, float]] = {}  # id -> (what arrived, start)
        self._handed: set[str] = set()  # ids given to the pool, not finished yet
        self._storages: dict[str, tuple[Storage, Storage]] = {}  # dataflow -> (file system, object store)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._feeder = threading.Thread(target=self._feed, name="subtask-feeder", daemon=True)

    # ---- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._feeder.start()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def _feed(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=1.0)  # and a sweep now and then, should a wake be missed
            self._wake.clear()
            while not self._closed:
                with self._lock:
                    room = THREADS * 2 - len(self._handed)
                    skip = list(self._handed)
                if room <= 0:
                    break
                marks = ", ".join("?" for _ in skip) or "''"
                rows = self.db.all(
                    "SELECT id FROM subtasks WHERE status = 'CREATED' AND dataflow_id IN "
                    "(SELECT id FROM dataflows WHERE status = 'Running') "
                    f"AND id NOT IN ({marks}) ORDER BY seq LIMIT ?", [*skip, room])
                if not rows:
                    break
                for row in rows:
                    with self._lock:
                        self._handed.add(row["id"])
                    self._pool.submit(self._run_logged, row["id"])

    def recover(self) -> None:
        """Settle what a killed service left RUNNING or CANCELING."""
        self.db.execute("UPDATE subtasks SET status = 'CANCELED', end_time = ? WHERE status = 'CANCELING'", (now(),))
        for row in self.db.all("SELECT id, attempts FROM subtasks WHERE status = 'RUNNING'"):
            if row["attempts"] >= MAX_ATTEMPTS:
                self.db.update("subtasks", row["id"], {
                    "status": "FAILED", "end_time": now(), "progress": 0,
                    "error": f"the service stopped {row['attempts']} times while this subtask ran; not tried again"})
            else:
                self.db.update("subtasks", row["id"], {"status": "CREATED", "progress": 0})
                log.warning("subtask %s was running when the service stopped: running it again", row["id"])

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._lock:
            for arrival, _ in self._running.values():
                arrival.cancel.set()  # stop copying; rows stay RUNNING and are resumed on start
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for pair in self._storages.values():
                for st in pair:
                    st.close()
            self._storages.clear()

    def forget(self, dataflow_id: str) -> None:
        """Close a deleted dataflow's connections."""
        with self._lock:
            pair = self._storages.pop(dataflow_id, None)
        for st in pair or ():
            st.close()

    # ---- live view and cancel ---------------------------------------------------------------------
    def live(self, subtask_id: str) -> tuple[int, float] | None:
        """(bytes arrived, seconds running) of a subtask copying now."""
        with self._lock:
            entry = self._running.get(subtask_id)
        return (entry[0].bytes, time.monotonic() - entry[1]) if entry else None

    def cancel(self, subtask_id: str) -> None:
        with self._lock:
            entry = self._running.get(subtask_id)
        if entry is not None:
            entry[0].cancel.set()

    # ---- one subtask --------------------------------------------------------------------------------
    def _run_logged(self, subtask_id: str) -> None:
        try:
            self._run(subtask_id)
        except Exception as exc:  # noqa: BLE001 - a bug fails the subtask, never the pool
            log.exception("subtask %s", subtask_id)
            self._finish(subtask_id, "FAILED", error=f"internal error: {type(exc).__name__}")
        finally:
            with self._lock:
                self._handed.discard(subtask_id)
            self._wake.set()

    def _run(self, subtask_id: str) -> None:
        sub = self.db.one("SELECT * FROM subtasks WHERE id = ?", (subtask_id,))
        if sub is None or sub["status"] != "CREATED":
            return
        flow = self.db.one("SELECT * FROM dataflows WHERE id = ?", (sub["dataflow_id"],))
        task = self.db.one("SELECT * FROM tasks WHERE id = ?", (sub["task_id"],))
        if flow is None or task is None or task["status"] not in ("Executing", "Pending"):
            self._finish(subtask_id, "CANCELED", error="its task or dataflow is gone or canceled")
            return
        if flow["status"] != "Running":
            return  # a stopped dataflow: StartDataFlow queues it again
        arrival = Arrival()
        with self._lock:
            self._running[subtask_id] = (arrival, time.monotonic())
        try:
            started = self.db.update("subtasks", subtask_id, {"status": "RUNNING", "start_time": now(),
                                                              "attempts": sub["attempts"] + 1}, "status = 'CREATED'")
            if started:
                self.svc.events.publish("subtask", {"DataFlowSubTaskId": subtask_id, "Status": "RUNNING"})
                self._copy(sub, flow, task, arrival)
        finally:
            with self._lock:
                self._running.pop(subtask_id, None)

    def _copy(self, sub: dict[str, Any], flow: dict[str, Any], task: dict[str, Any], arrival: Arrival) -> None:
        fs, store = self._open(flow)
        importing = task["action"] == "StreamImport"
        src, dst = (store, fs) if importing else (fs, store)
        src_key = paths.source_key(task["directory"], sub["src_path"])
        dst_key = paths.destination_key(task["dst_directory"], sub["dst_path"])
        try:
            entry = src.head(src_key)
        except NotFound:
            self._finish(sub["id"], "FAILED", error=f"SOURCE_NOT_FOUND: {sub['src_path']} does not exist at the source")
            return
        except OssimportError as exc:
            self._finish(sub["id"], "FAILED", error=f"{exc.code}: {exc}")
            return
        detail = {"file_mtime": round(entry.mtime * 1e6) * 1000, "file_size": entry.size, "bytes_total": entry.size}
        self.db.update("subtasks", sub["id"], detail)  # BytesTotal: Progress counts against it from now
        problem = _condition_problem(sub, entry)
        if problem:
            self._finish(sub["id"], "FAILED", error=f"CONDITION_NOT_MET: {problem}", **detail)
            return
        policy = Policy.from_conflict(task["conflict_policy"])
        existing: Entry | None = None
        if policy.needs_destination:
            try:
                existing = dst.head(dst_key)
            except NotFound:
                existing = None
        if sub["attempts"] and not dst.abilities.multipart:
            # an earlier run was killed mid-copy: its temporary file goes (object stores drop
            # unfinished multipart uploads of the key in the transfer itself)
            dst.remove_stale_temps([dst_key])
        outcomes: list[Outcome] = []
        opts = RunOptions(policy=policy, threads=1, transfer=TransferOptions(**TRANSFER))  # type: ignore[arg-type]
        runner = Runner(src, Arriving(dst, arrival), opts, Stats(),  # type: ignore[arg-type]
                        listener=outcomes.append)
        started = time.monotonic()
        runner.run_items([(entry, existing, dst_key)])
        seconds = max(time.monotonic() - started, 1e-3)
        last = outcomes[-1] if outcomes else Outcome(Kind.FAILED, dst_key, code="Internal", message="no outcome")
        event, text = last.kind.value, f"{last.code}: {last.message}" if last.failed else ""
        crc, arrived = arrival.checksum()
        if arrival.cancel.is_set() and event != "copied" and self._closed:
            # the service is stopping, nobody canceled: waiting again for the next start, and
            # this start does not count among the MAX_ATTEMPTS (a CANCELING row stays canceled)
            if self.db.update("subtasks", sub["id"], {"status": "CREATED", "attempts": sub["attempts"]},
                              "status = 'RUNNING'"):
                return
        if arrival.cancel.is_set() and event != "copied":
            self._finish(sub["id"], "CANCELED", error="canceled", actual_bytes=0, **detail)
        elif event == "copied":
            self._finish(sub["id"], "COMPLETE", progress=10000, bytes_done=entry.size, actual_bytes=arrived,
                         average_speed=int(arrived / seconds),
                         checksum=f"crc64:{crc}" if arrived == entry.size else "", **detail)
        elif event == "skipped":
            self._finish(sub["id"], "COMPLETE", progress=10000, bytes_done=entry.size, actual_bytes=0,
                         error="", **detail)
        else:
            self._finish(sub["id"], "FAILED", error=text, actual_bytes=0, **detail)

    def _open(self, flow: dict[str, Any]) -> tuple[Storage, Storage]:
        with self._lock:
            pair = self._storages.get(flow["id"])
            if pair is None:
                fs_root = paths.file_system_root(self.svc.conf_dir, flow["fs_id"], flow["fs_path"])
                store = paths.object_root(parse_address(flow["source_storage"]), flow["source_storage_path"])
                options = StorageOptions(max_pool=THREADS * 4)
                pair = self._storages[flow["id"]] = (open_storage(fs_root, options), open_storage(store, options))
            return pair

    def _finish(self, subtask_id: str, status: str, **values: Any) -> None:
        values = {"status": status, "end_time": now(), **values}
        guard = "status IN ('CREATED', 'RUNNING', 'CANCELING')"
        if self.db.update("subtasks", subtask_id, values, guard):
            self.svc.events.publish("subtask", {"DataFlowSubTaskId": subtask_id, "Status": status})


def _condition_problem(sub: dict[str, Any], entry: Entry) -> str:
    """Why the source does not meet the subtask's Condition ('' when it does or there is none).
    ModifyTime is compared to the second: object stores keep no finer mtime."""
    if sub["cond_size"] is not None and sub["cond_size"] != entry.size:
        return f"the source has {entry.size} bytes, Condition.Size is {sub['cond_size']}"
    if sub["cond_mtime"] is not None and sub["cond_mtime"] // 10**9 != int(entry.mtime):
        return (f"the source was modified at {int(entry.mtime * 1e9)} ns, Condition.ModifyTime is "
                f"{sub['cond_mtime']}")
    return ""
