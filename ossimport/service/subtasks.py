"""Running dataflow subtasks: one file each, through the engine (`engine.single.copy_single`, the
one copy path), on the job system's workers when any is connected, else on a pool of threads in
the service process.

A subtask row goes CREATED -> RUNNING -> COMPLETE | FAILED | CANCELED (CANCELING while a running
copy stops). RUNNING is written before the subtask is handed on and COMPLETE only after the
engine verified the copy, so a kill -9 can leave RUNNING but never COMPLETE without its bytes. On
the next start `recover` puts such a subtask back to CREATED (copies are atomic at the
destination, so running it again is safe; one the master still holds is claimed, not run twice),
or marks it FAILED with the reason after MAX_ATTEMPTS starts.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossimport.address import parse_address
from ossimport.engine.arrival import Arrival
from ossimport.engine.single import SingleRequest, SingleResult, copy_single, remove_partial
from ossimport.jobs.protocol import location_to_dict
from ossimport.service import paths
from ossimport.service.errors import ApiError
from ossimport.service.remote import MasterLink
from ossimport.storage import open_storage
from ossimport.storage.base import Entry, Storage, StorageOptions

log = logging.getLogger("ossimport.service")
MAX_ATTEMPTS = 3  # service starts a subtask may see RUNNING before it is failed instead of resumed
THREADS = 4  # subtasks copying at once in the service process
MASTER_SILENT = 30.0  # seconds without word from the master before its subtasks are taken back


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


@dataclass
class Away:
    """A subtask handed to the master: what to send again, what it reported."""

    body: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    bytes: int = 0
    sized: bool = False
    canceled: bool = False  # CancelDataFlowSubTask was asked: said again at each sub-status


class Executor:
    """Runs CREATED subtasks of running dataflows, oldest first. The database is the queue: a
    feeder thread takes a bounded window of them at a time (memory stays flat however many
    wait) and hands each to the job master when workers are connected, else to its own pool;
    `wake()` after a change makes it look at once."""

    def __init__(self, service: Any) -> None:
        self.svc = service
        self.db = service.db
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="subtask")
        self._cleaner = ThreadPoolExecutor(1, thread_name_prefix="subtask-cleanup")  # not behind copies
        self._running: dict[str, tuple[Arrival, float]] = {}  # in this process: id -> (what arrived, start)
        self._handed: set[str] = set()  # ids given to the pool, not finished yet
        self._away: dict[str, Away] = {}  # ids handed to the master, not finished yet
        self._storages: dict[str, tuple[Storage, Storage]] = {}  # dataflow -> (file system, object store)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._feeder = threading.Thread(target=self._feed, name="subtask-feeder", daemon=True)
        conf = service.sysconf
        self.link = MasterLink(conf.masterAddress, Path(conf.curveKeysDir), self._from_master)
        self.started = {"service": 0, "workers": 0}  # subtasks started, by where they ran (a metric)

    # ---- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self.link.start()
        self._feeder.start()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def _feed(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=1.0)  # and a sweep now and then, should a wake be missed
            self._wake.clear()
            try:
                self._reclaim_if_master_silent()
                self._feed_once()
            except Exception:  # noqa: BLE001 - the feeder must outlive a bad moment (the db busy, a bug)
                log.exception("handing out subtasks")

    def _feed_once(self) -> None:
        """Hand out CREATED subtasks until the window is full or none waits."""
        while not self._closed and self.link.settled:
            workers = self.link.workers
            with self._lock:
                if workers:
                    # two rounds of every worker's slots in flight: the next is there when one ends
                    room = max(2 * THREADS, 2 * max(self.link.slots, workers)) - len(self._away)
                else:
                    room = THREADS * 2 - len(self._handed)
                skip = [*self._handed, *self._away]
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
                if workers:
                    self._send_away(row["id"])
                else:
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
                    "error": f"started {row['attempts']} times without finishing (the service or its worker stopped "
                             "while it ran); not tried again"})
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
        self._cleaner.shutdown(wait=True, cancel_futures=True)
        self.link.close()  # subtasks away stay RUNNING: the next start claims them from the master
        with self._lock:
            away = list(self._away)
        for sub_id in away:  # their copies go on at the workers: this start is not among the MAX_ATTEMPTS
            self.db.execute("UPDATE subtasks SET attempts = attempts - 1 WHERE id = ? AND attempts > 0 "
                            "AND status IN ('RUNNING', 'CANCELING')", (sub_id,))
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
    @property
    def in_process(self) -> int:
        """Subtasks copying in this process now."""
        with self._lock:
            return len(self._running)

    def live(self, subtask_id: str) -> tuple[int, float] | None:
        """(bytes arrived, seconds running) of a subtask copying now."""
        with self._lock:
            entry = self._running.get(subtask_id)
            away = self._away.get(subtask_id)
        if entry is not None:
            return entry[0].bytes, time.monotonic() - entry[1]
        return (away.bytes, time.monotonic() - away.started) if away is not None else None

    def cancel(self, subtask_id: str) -> None:
        with self._lock:
            entry = self._running.get(subtask_id)
            away = subtask_id in self._away
            if away:
                self._away[subtask_id].canceled = True
        if entry is not None:
            entry[0].cancel.set()
        elif away:
            self.link.send("sub-cancel", id=subtask_id)

    # ---- what a subtask needs ---------------------------------------------------------------------------
    def _claim(self, subtask_id: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        """CREATED -> RUNNING for a subtask whose dataflow runs: (subtask, dataflow, task), or None
        when it is not to run now."""
        sub = self.db.one("SELECT * FROM subtasks WHERE id = ?", (subtask_id,))
        if sub is None or sub["status"] != "CREATED":
            return None
        flow = self.db.one("SELECT * FROM dataflows WHERE id = ?", (sub["dataflow_id"],))
        task = self.db.one("SELECT * FROM tasks WHERE id = ?", (sub["task_id"],))
        if flow is None or task is None or task["status"] not in ("Executing", "Pending"):
            self._finish(subtask_id, "CANCELED", error="its task or dataflow is gone or canceled")
            return None
        if flow["status"] != "Running":
            return None  # a stopped dataflow: StartDataFlow queues it again
        if not self.db.update("subtasks", subtask_id, {"status": "RUNNING", "start_time": now(),
                                                       "attempts": sub["attempts"] + 1}, "status = 'CREATED'"):
            return None
        self.svc.events.publish("subtask", {"DataFlowSubTaskId": subtask_id, "Status": "RUNNING"})
        return sub, flow, task

    @staticmethod
    def _request(sub: dict[str, Any], task: dict[str, Any]) -> SingleRequest:
        return SingleRequest(
            src_key=paths.source_key(task["directory"], sub["src_path"]),
            dst_key=paths.destination_key(task["dst_directory"], sub["dst_path"]),
            conflict=task["conflict_policy"], src_path=sub["src_path"], cond_size=sub["cond_size"],
            cond_mtime=sub["cond_mtime"], again=bool(sub["attempts"]))

    def _locations(self, flow: dict[str, Any]) -> tuple[Any, Any]:
        """(file system root, object store root) of a dataflow."""
        fs_root = paths.file_system_root(self.svc.conf_dir, flow["fs_id"], flow["fs_path"])
        store = paths.object_root(parse_address(flow["source_storage"]), flow["source_storage_path"])
        return fs_root, store

    # ---- on the job system's workers -------------------------------------------------------------------
    def _send_away(self, subtask_id: str) -> None:
        try:
            claimed = self._claim(subtask_id)
            if claimed is None:
                return
            sub, flow, task = claimed
            fs_root, store = self._locations(flow)
        except ApiError as exc:  # the file system's directory is gone, since the dataflow was made
            self._finish(subtask_id, "FAILED", error=f"{exc.code}: {exc.message}")
            return
        except Exception as exc:  # noqa: BLE001 - a bug fails the subtask, never the feeder
            log.exception("subtask %s", subtask_id)
            self._finish(subtask_id, "FAILED", error=f"internal error: {type(exc).__name__}")
            return
        src, dst = (store, fs_root) if task["action"] == "StreamImport" else (fs_root, store)
        body = {"id": subtask_id, "spec": {"src": location_to_dict(src), "dst": location_to_dict(dst)},
                "request": self._request(sub, task).to_dict()}
        with self._lock:
            self._away[subtask_id] = Away(body)
            self.started["workers"] += 1
        self.link.send("sub-submit", items=[body])
        row = self.db.one("SELECT status FROM subtasks WHERE id = ?", (subtask_id,))
        if row is not None and row["status"] == "CANCELING":
            # canceled between RUNNING and `_away` (cancel() found it nowhere): the master gets
            # the cancel right after the submit, on the same line
            self.link.send("sub-cancel", id=subtask_id)

    def _from_master(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "sub-status":
            known = set(msg.get("known", []))
            with self._lock:
                lost = [a.body for i, a in self._away.items() if i not in known]
                canceled = [i for i, a in self._away.items() if a.canceled]
            if lost:  # a restarted master forgot them (or never got them): again
                self.link.send("sub-submit", items=lost)
            for sub_id in canceled:  # until answered: a cancel lost on the way, or forgotten, is said again
                self.link.send("sub-cancel", id=sub_id)
            if not msg.get("workers") and msg.get("queued"):  # the last worker left: run them here
                self.link.send("sub-withdraw", ids=msg["queued"])
            self.wake()
        elif kind == "sub-withdrawn":
            self._take_back([str(i) for i in msg.get("ids", [])])
        elif kind == "sub-progress":
            for sub_id, (arrived, size) in msg.get("subs", {}).items():
                with self._lock:
                    away = self._away.get(sub_id)
                    if away is None:
                        continue
                    away.bytes = int(arrived)
                    first = not away.sized and size >= 0
                    away.sized = away.sized or first
                if first:  # BytesTotal: Progress counts against it from now
                    self.db.update("subtasks", sub_id, {"bytes_total": int(size), "file_size": int(size)},
                                   "status IN ('RUNNING', 'CANCELING')")
        elif kind == "sub-result":
            sub_id = str(msg.get("id"))
            with self._lock:
                away = self._away.pop(sub_id, None)
            if away is not None:
                result = SingleResult.from_dict(msg.get("result", {}))
                if result.status == "CANCELED":
                    self._cancel_settled(sub_id, result, ("RUNNING", "CANCELING"))
                else:
                    self._settle(sub_id, result)
                self.wake()

    def _reclaim_if_master_silent(self) -> None:
        """Subtasks away while the master says nothing for MASTER_SILENT seconds come back here:
        never RUNNING forever for want of a master."""
        with self._lock:
            if not self._away or time.monotonic() - self.link.heard < MASTER_SILENT:
                return
            oldest = min(a.started for a in self._away.values())
            if time.monotonic() - oldest < MASTER_SILENT:
                return
        log.warning("the job master is silent: %d subtasks run in the service instead", len(self._away))
        self._take_back(list(self._away))

    def _take_back(self, ids: list[str]) -> None:
        """Subtasks away that no worker will run: CREATED again. It counts as an attempt (a worker
        may have begun it: the next run removes what that left)."""
        with self._lock:
            for sub_id in ids:
                self._away.pop(sub_id, None)
        for sub_id in ids:
            if not self.db.update("subtasks", sub_id, {"status": "CREATED"}, "status = 'RUNNING'"):
                # canceled while away: the cancel may have reached no worker, so none answers it
                self._cancel_settled(sub_id, SingleResult("CANCELED", "canceled"), ("CANCELING",))
        self.wake()

    def _cancel_settled(self, subtask_id: str, result: SingleResult, only_from: tuple[str, ...]) -> None:
        """CANCELED, once what a worker killed while copying it left at the destination is gone (the
        cancel may have been answered for it by the master, or by nobody): on a thread of its own,
        not the caller's (the link's, the feeder's)."""
        if self._closed:
            return  # CANCELING until the next start settles it
        self._cleaner.submit(self._remove_partial_then_settle, subtask_id, result, only_from)

    def _remove_partial_then_settle(self, subtask_id: str, result: SingleResult, only_from: tuple[str, ...]) -> None:
        try:
            sub = self.db.one("SELECT * FROM subtasks WHERE id = ?", (subtask_id,))
            flow = sub and self.db.one("SELECT * FROM dataflows WHERE id = ?", (sub["dataflow_id"],))
            task = sub and self.db.one("SELECT * FROM tasks WHERE id = ?", (sub["task_id"],))
            if sub and flow and task and sub["status"] in only_from:
                fs, store = self._open(flow)
                remove_partial(fs if task["action"] == "StreamImport" else store, self._request(sub, task).dst_key)
        except Exception:  # noqa: BLE001 - a leftover that cannot be removed does not keep it CANCELING
            log.exception("subtask %s: removing what a killed copy left", subtask_id)
        self._finish(subtask_id, result.status, only_from=only_from, **result.row())

    # ---- in the service process ------------------------------------------------------------------------
    def _run_logged(self, subtask_id: str) -> None:
        try:
            self._run(subtask_id)
        except ApiError as exc:  # the file system's directory is gone, since the dataflow was made
            self._finish(subtask_id, "FAILED", error=f"{exc.code}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - a bug fails the subtask, never the pool
            log.exception("subtask %s", subtask_id)
            self._finish(subtask_id, "FAILED", error=f"internal error: {type(exc).__name__}")
        finally:
            with self._lock:
                self._handed.discard(subtask_id)
            self._wake.set()

    def _run(self, subtask_id: str) -> None:
        arrival = Arrival()
        with self._lock:
            self._running[subtask_id] = (arrival, time.monotonic())
        try:
            claimed = self._claim(subtask_id)
            if claimed is None:
                return
            sub, flow, task = claimed
            with self._lock:
                self.started["service"] += 1
            fs, store = self._open(flow)
            src, dst = (store, fs) if task["action"] == "StreamImport" else (fs, store)

            def sized(entry: Entry) -> None:  # BytesTotal: Progress counts against it from now
                self.db.update("subtasks", subtask_id, {"bytes_total": entry.size, "file_size": entry.size})

            result = copy_single(src, dst, self._request(sub, task), arrival, sized)
            if result.status == "CANCELED" and self._closed:
                # the service is stopping, nobody canceled: waiting again for the next start, and
                # this start does not count among the MAX_ATTEMPTS (a CANCELING row stays canceled)
                if self.db.update("subtasks", subtask_id, {"status": "CREATED", "attempts": sub["attempts"]},
                                  "status = 'RUNNING'"):
                    return
            self._settle(subtask_id, result)
        finally:
            with self._lock:
                self._running.pop(subtask_id, None)

    def _open(self, flow: dict[str, Any]) -> tuple[Storage, Storage]:
        with self._lock:
            pair = self._storages.get(flow["id"])
            if pair is None:
                fs_root, store = self._locations(flow)
                options = StorageOptions(max_pool=THREADS * 4)
                pair = self._storages[flow["id"]] = (open_storage(fs_root, options), open_storage(store, options))
            return pair

    # ---- the end ------------------------------------------------------------------------------------
    def _settle(self, subtask_id: str, result: SingleResult) -> None:
        self._finish(subtask_id, result.status, **result.row())

    def _finish(self, subtask_id: str, status: str, only_from: tuple[str, ...] = ("CREATED", "RUNNING", "CANCELING"),
                **values: Any) -> None:
        values = {"status": status, "end_time": now(), **values}
        if self.db.update("subtasks", subtask_id, values, f"status IN ({', '.join(repr(s) for s in only_from)})"):
            self.svc.events.publish("subtask", {"DataFlowSubTaskId": subtask_id, "Status": status})
