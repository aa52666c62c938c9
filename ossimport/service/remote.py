"""The service's line to the job master: subtasks go to the job system's workers through it.

One thread owns a ZeroMQ DEALER connected to the master (CURVE, with the worker key pair of the
working directory: the service runs beside the master). Other threads hand it messages through a
queue and a `Wakeup` that ends its poll. Once a second it asks `sub-poll`; the answer says how many
workers are connected (none: the service copies in its own process) and which of our subtasks
the master holds, so the ones a restarted master forgot are submitted again.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ossimport.jobs.protocol import ProtocolError, pack, unpack
from ossimport.jobs.security import CurveClientKeys
from ossimport.jobs.wakeup import Wakeup

log = logging.getLogger("ossimport.service")
POLL = 1.0  # seconds between sub-polls
STALE = 3.5  # seconds without a sub-status after which no worker counts as connected

Handler = Callable[[dict[str, Any]], None]


class MasterLink:
    def __init__(self, address: str, keys_dir: Path, on_message: Handler) -> None:
        self.address = address
        self.keys_dir = keys_dir
        self.on_message = on_message
        self.identity = f"service-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._wake = Wakeup()
        self._stop = threading.Event()
        self._workers = 0
        self.slots = 0  # the connected workers' subtask slots, as the master last said
        self.heard = 0.0  # monotonic time of the last sub-status (0: never)
        self._since = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="master-link", daemon=True)

    @property
    def workers(self) -> int:
        """Workers connected to the master, as it said within STALE seconds (else 0)."""
        return self._workers if time.monotonic() - self.heard < STALE else 0

    @property
    def settled(self) -> bool:
        """Whether `workers` can be believed: the master answered once, there is no job system
        here, or it stayed silent for STALE seconds (a service starting beside a running master
        must not run in its own process what the master's workers would take)."""
        return (self.heard > 0 or not (self.keys_dir / "worker.key_secret").exists()
                or time.monotonic() - self._since > STALE)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._wake.close()

    def send(self, kind: str, **body: Any) -> None:
        if self._stop.is_set():
            return  # closed: the wake-up pipe may be gone (what was away is claimed on the next start)
        self._outbox.put(pack(kind, **body))
        self._wake.set()

    def _connect(self, ctx: zmq.Context) -> zmq.Socket | None:
        if not (self.keys_dir / "worker.key_secret").exists():
            return None  # no job system here yet (`console start` makes the keys)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        try:
            CurveClientKeys(self.keys_dir).apply(sock)
        except Exception as exc:  # noqa: BLE001 - unreadable keys: run subtasks here, say why once
            log.warning("not connecting to the job master: %s", exc)
            sock.close()
            return None
        sock.connect(self.address)
        return sock

    def _loop(self) -> None:
        ctx = zmq.Context.instance()
        sock: zmq.Socket | None = None
        next_poll = 0.0
        try:
            while not self._stop.is_set():
                if sock is None:
                    sock = self._connect(ctx)
                    if sock is None:
                        self._drain(None)
                        self._stop.wait(POLL)
                        continue
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLIN)
                poller.register(self._wake, zmq.POLLIN)
                poller.poll(max(0.0, next_poll - time.monotonic()) * 1000)
                self._wake.clear()
                self._drain(sock)
                while sock.poll(0):
                    self._receive(sock.recv())
                if time.monotonic() >= next_poll:
                    self._send(sock, pack("sub-poll"))
                    next_poll = time.monotonic() + POLL
        finally:
            if sock is not None:
                sock.close()

    def _drain(self, sock: zmq.Socket | None) -> None:
        while True:
            try:
                frame = self._outbox.get_nowait()
            except queue.Empty:
                return
            if sock is not None:  # without a master nothing is sent: the next sub-status asks again
                self._send(sock, frame)

    @staticmethod
    def _send(sock: zmq.Socket, frame: bytes) -> None:
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            log.debug("job master unreachable: a message waits for the next sub-status")

    def _receive(self, frame: bytes) -> None:
        try:
            msg = unpack(frame)
        except ProtocolError as exc:
            log.warning("ignoring a message from the job master: %s", exc)
            return
        if msg["type"] == "sub-status":
            self._workers = int(msg.get("workers", 0))
            self.slots = int(msg.get("slots", 0))
            self.heard = time.monotonic()
        try:
            self.on_message(msg)
        except Exception:  # noqa: BLE001 - a bad message must not end the link
            log.exception("handling %s from the job master", msg.get("type"))
