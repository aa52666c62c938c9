"""Live events for `GET /api/events` (server-sent events): job and subtask progress.

Each listener has a bounded queue; a listener that does not keep up loses the oldest events
(the page re-reads the state it needs), so a stalled browser never grows the service's memory.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any


class Events:
    def __init__(self, backlog: int = 256) -> None:
        self._listeners: set[queue.Queue[str]] = set()
        self._lock = threading.Lock()
        self._backlog = backlog
        self._seq = 0

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            message = f"id: {self._seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            for q in self._listeners:
                while True:
                    try:
                        q.put_nowait(message)
                        break
                    except queue.Full:
                        try:
                            q.get_nowait()
                        except queue.Empty:
                            pass

    def listen(self) -> queue.Queue[str]:
        q: queue.Queue[str] = queue.Queue(self._backlog)
        with self._lock:
            self._listeners.add(q)
        return q

    def leave(self, q: queue.Queue[str]) -> None:
        with self._lock:
            self._listeners.discard(q)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._listeners)
