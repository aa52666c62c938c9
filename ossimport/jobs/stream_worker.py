"""A worker's subtask slots: single-file copies of streaming dataflows, run beside its job task.

The master pushes a subtask to a worker with a free slot (`sub_free` rides on every want, beat
and sub-result). Each runs `engine.single.copy_single` on a small thread pool; its bytes so far
ride on the heartbeat (they renew its lease at the master), its result is sent again until the
master acknowledges it. Killed at any instant, the worker loses only the copies in flight: their
leases lapse and the master hands them on (copies are atomic at the destination).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ossimport.engine.arrival import Arrival
from ossimport.engine.single import SingleRequest, SingleResult, copy_single
from ossimport.engine.throttle import TokenBucket
from ossimport.jobs.protocol import location_from_dict
from ossimport.jobs.wakeup import Wakeup
from ossimport.storage import open_storage
from ossimport.storage.base import Entry, Storage, StorageOptions

log = logging.getLogger("ossimport.worker")
SLOTS = 4  # subtasks copying at once per worker
RESEND = 3.0  # seconds before an unacknowledged result is sent again
MAX_SPECS = 16  # dataflows whose connections are kept open


@dataclass
class Running:
    id: str
    arrival: Arrival = field(default_factory=Arrival)
    total: int | None = None  # the source's size once headed
    result: SingleResult | None = None
    sent_at: float = 0.0


class StreamSlots:
    def __init__(self, slots: int = SLOTS, bucket: TokenBucket | None = None, done: Wakeup | None = None) -> None:
        self.slots = slots
        self.done = done  # set when a result is ready: the worker's loop sends it at once
        self.bucket = bucket  # the worker's bandwidth limit binds its subtasks too
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="subtask") if slots > 0 else None
        self._items: dict[str, Running] = {}  # running or waiting for the master's ack
        self._storages: dict[str, tuple[Storage, Storage]] = {}  # spec json -> (src, dst)
        self._users: dict[str, int] = {}  # spec json -> copies using its storages now
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        with self._lock:
            return self.slots - sum(1 for r in self._items.values() if r.result is None)

    def start(self, msg: dict[str, Any]) -> bool:
        """Begin a pushed subtask; False when every slot is taken (the master is told)."""
        if self._pool is None:
            return False
        sub_id = str(msg["id"])
        with self._lock:
            if sub_id in self._items:
                return True  # a repeated push: already at work on it
            if sum(1 for r in self._items.values() if r.result is None) >= self.slots:
                return False
            running = self._items[sub_id] = Running(sub_id)
        self._pool.submit(self._run, running, msg)
        return True

    def _run(self, running: Running, msg: dict[str, Any]) -> None:
        def sized(entry: Entry) -> None:
            running.total = entry.size

        key = json.dumps(msg["spec"], sort_keys=True)
        try:
            missing = _missing_directory(msg["spec"])
            if missing:
                result = SingleResult("FAILED", f"FILE_SYSTEM_NOT_FOUND: {missing} does not exist on worker host "
                                      f"{socket.gethostname()}; a dataflow's file system must be mounted at the same "
                                      "path on every worker host")
            else:
                src, dst = self._open(key, msg["spec"])
                try:
                    result = copy_single(src, dst, SingleRequest.from_dict(msg["request"]), running.arrival, sized,
                                         self.bucket)
                finally:
                    self._release(key)
        except Exception as exc:  # noqa: BLE001 - a bug fails the subtask, never the worker
            log.exception("subtask %s", running.id)
            result = SingleResult("FAILED", f"internal error: {type(exc).__name__}")
        log.info("subtask %s: %s %s", running.id, result.status, result.error)
        running.result = result
        if self.done is not None:
            self.done.set()

    def _open(self, key: str, spec: dict[str, Any]) -> tuple[Storage, Storage]:
        """The dataflow's storages, kept open between its subtasks; held until `_release`."""
        with self._lock:
            pair = self._storages.get(key)
            if pair is None:
                # close dataflows nobody copies with now, beyond MAX_SPECS (never one in use)
                idle = [k for k in self._storages if not self._users.get(k)]
                for old in idle[:max(0, len(self._storages) - MAX_SPECS + 1)]:
                    for st in self._storages.pop(old):
                        st.close()
                options = StorageOptions(max_pool=self.slots * 4)
                pair = self._storages[key] = (open_storage(location_from_dict(spec["src"]), options),
                                              open_storage(location_from_dict(spec["dst"]), options))
            self._users[key] = self._users.get(key, 0) + 1
            return pair

    def _release(self, key: str) -> None:
        with self._lock:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]

    def cancel(self, sub_id: str) -> None:
        with self._lock:
            running = self._items.get(sub_id)
        if running is not None:
            running.arrival.cancel.set()

    def progress(self) -> dict[str, list[int]]:
        """id -> [bytes arrived, size or -1] of every subtask held (the heartbeat's payload)."""
        with self._lock:
            items = list(self._items.values())
        return {r.id: [r.arrival.bytes, -1 if r.total is None else r.total] for r in items}

    def due(self) -> list[tuple[str, SingleResult]]:
        """Results to send now: new ones, and those unacknowledged for RESEND seconds."""
        now = time.monotonic()
        out = []
        with self._lock:
            for r in self._items.values():
                if r.result is not None and now - r.sent_at >= RESEND:
                    r.sent_at = now
                    out.append((r.id, r.result))
        return out

    def acked(self, sub_id: str) -> None:
        with self._lock:
            running = self._items.get(sub_id)
            if running is not None and running.result is not None:
                del self._items[sub_id]

    def drop(self, sub_id: str) -> None:
        """The master gave the subtask to someone else: stop, say nothing more of it."""
        with self._lock:
            running = self._items.pop(sub_id, None)
        if running is not None:
            running.arrival.cancel.set()

    def close(self) -> None:
        with self._lock:
            for r in self._items.values():
                r.arrival.cancel.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for pair in self._storages.values():
                for st in pair:
                    st.close()
            self._storages.clear()


def _missing_directory(spec: dict[str, Any]) -> str:
    """The local root of a dataflow's file system when this host lacks it ('' when all is there):
    copying anyway would write a StreamImport onto this host's own disk and call it COMPLETE."""
    for side in ("src", "dst"):
        loc = location_from_dict(spec[side])
        if loc.backend == "local" and not os.path.isdir(loc.path):
            return loc.path
    return ""
