"""Pushes progress to `/api/events` listeners: once a second, every job whose counters changed
and every subtask copying now (only while someone listens: counting a job reads its task
directories). Every EXPIRE_EVERY seconds it also expires subtasks that waited too long (expiry.py)."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from ossimport.service.expiry import expire_subtasks
from ossimport.service.jobs_api import job_item

log = logging.getLogger("ossimport.service")
INTERVAL = 1.0
EXPIRE_EVERY = 5  # ticks between expiry sweeps: a sweep reads every waiting subtask


class Ticker:
    def __init__(self, service: Any) -> None:
        self.svc = service
        self._stop = threading.Event()
        self._last: dict[str, str] = {}
        self._thread = threading.Thread(target=self._loop, name="events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def expire(self) -> None:
        try:
            expire_subtasks(self.svc)
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("expiring subtasks")

    def _loop(self) -> None:
        ticks = 0
        while not self._stop.wait(INTERVAL):
            ticks += 1
            if ticks % EXPIRE_EVERY == 0:
                self.expire()
            if not self.svc.events.listeners:
                self._last.clear()  # a new listener gets the current state of everything
                continue
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not end the live view
                log.exception("publishing progress")

    def tick(self) -> None:
        svc = self.svc
        names = [j.name for j in svc.workdir.jobs()] + svc.workdir.queued()
        for name in names:
            item = job_item(svc, name)
            text = json.dumps(item, sort_keys=True)
            if self._last.get(name) != text:
                self._last[name] = text
                svc.events.publish("job", item)
        for row in svc.db.all("SELECT id, bytes_total FROM subtasks WHERE status = 'RUNNING'"):
            live = svc.executor.live(row["id"])
            if live is not None:
                total = row["bytes_total"]
                svc.events.publish("subtask", {
                    "DataFlowSubTaskId": row["id"], "Status": "RUNNING", "BytesDone": live[0],
                    "Progress": min(9999, live[0] * 10000 // total) if total else 0})
