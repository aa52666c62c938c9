"""A worker: `ossimport worker --master tcp://HOST:PORT`. Any number, on any host.

It asks the master for a task, runs it through the engine on a background thread, heartbeats the
leases of what it holds, and sends the result until the master acknowledges it. It keeps its
in-flight state in its own directory (no shared disk with the master). Killed at any instant, it
loses only unfinished work: the lapsed lease returns the task to pending and it is done again
(copies are idempotent; the master counts each task once).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ossimport.engine.stats import Stats
from ossimport.engine.throttle import TokenBucket
from ossimport.errors import OssimportError
from ossimport.jobs.execute import JobSpec, TaskResult, TaskRunner
from ossimport.jobs.protocol import ProtocolError, pack, unpack
from ossimport.jobs.security import CurveClientKeys
from ossimport.jobs.store import atomic_write, decode_manifest
from ossimport.jobs.stream_worker import SLOTS, StreamSlots
from ossimport.jobs.wakeup import Wakeup

log = logging.getLogger("ossimport.worker")
SUB_BEAT = 0.5  # seconds between reports of subtask bytes


@dataclass
class Held:
    job: str
    task: str
    lease: str
    received: float
    stats: Stats
    thread: threading.Thread
    result: TaskResult | None = None
    sent_at: float = 0.0
    runner: TaskRunner | None = None
    dropped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    abort_on_unexpected: bool = False  # the job's workerAbortWhenUncatchedException
    unexpected: str = ""  # the task ended by an exception that is not a storage or config error


class Worker:
    def __init__(self, master: str, workdir: Path, *, worker_id: str | None = None,
                 heartbeat: float = 2.0, max_throughput_kbps: int = 0,
                 curve: CurveClientKeys | None = None, subtask_slots: int = SLOTS) -> None:
        self.master = master
        self.workdir = Path(workdir)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.heartbeat = heartbeat
        self.curve = curve
        self.bucket = TokenBucket(max_throughput_kbps * 1024) if max_throughput_kbps > 0 else None
        self.stop_event = threading.Event()
        self._runners: dict[str, tuple[str, TaskRunner]] = {}  # job -> (spec json, runner)
        self._held: Held | None = None
        self._want_after = 0.0
        self.exit_code = 0  # 1: stopped by an unexpected error (workerAbortWhenUncatchedException)
        self._done = Wakeup()  # a subtask's result is ready
        self.streams = StreamSlots(subtask_slots, self.bucket, self._done)  # dataflow subtasks, beside the job task

    # ---- main loop ------------------------------------------------------------------------------
    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.master)
        self._sock = sock
        self._hello(sock)
        last_beat = last_sub_beat = 0.0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._done, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                poller.poll(200)
                self._done.clear()
                while sock.poll(0):
                    self._handle(sock, sock.recv())
                now = time.monotonic()
                held = self._held
                if held is not None and held.result is None and not held.thread.is_alive():
                    held.unexpected = "the task thread ended without a result"
                    held.result = TaskResult(False, {"files": 0}, [f"FAILED\t\t{held.unexpected}"], [])
                if held is not None and held.result is not None and now - held.sent_at > 3.0:
                    self._send_result(sock, held)
                if now - last_beat >= self.heartbeat:
                    self._beat(sock)
                    last_beat = now
                for sub_id, result in self.streams.due():
                    self._send(sock, "sub-result", id=sub_id, result=result.to_dict(), sub_free=self.streams.free)
                if now - last_sub_beat >= SUB_BEAT:
                    # subtasks report their bytes more often than the job's heartbeat: Progress moves
                    progress = self.streams.progress()
                    if progress:
                        self._send(sock, "sub-beat", subs=progress, sub_free=self.streams.free)
                    last_sub_beat = now
                if held is None and now >= self._want_after:
                    self._send(sock, "want", sub_free=self.streams.free)
                    self._want_after = now + 2.0  # ask again if the answer was lost
        finally:
            if self._held is not None and self._held.runner is not None:
                self._held.runner.stop()
            self.streams.close()
            self._done.close()
            for _, runner in self._runners.values():
                runner.close()
            sock.close()

    def _send(self, sock: zmq.Socket, kind: str, **body: Any) -> None:
        # Never block: with no connection to the master (CURVE refused, queue full) a blocking send
        # would hang the loop for good, deaf to SIGTERM. Every message is repeated until answered.
        try:
            sock.send(pack(kind, worker=self.id, **body), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("master unreachable: %s not sent", kind)

    def _hello(self, sock: zmq.Socket) -> None:
        self._send(sock, "hello", host=socket.gethostname(), pid=os.getpid(), sub_slots=self.streams.slots,
                   sub_free=self.streams.free)

    def _handle(self, sock: zmq.Socket, frame: bytes) -> None:
        try:
            msg = unpack(frame)
        except ProtocolError as exc:
            log.error("ignoring a message from the master: %s", exc)
            return
        kind = msg["type"]
        if kind == "task":
            self._start(msg)
        elif kind == "idle":
            self._want_after = time.monotonic() + float(msg.get("wait", 1.0))
        elif kind == "ack":
            held = self._held
            if held is not None and held.task == msg.get("task"):
                shutil.rmtree(self._task_dir(held.job, held.task), ignore_errors=True)
                self._held = None
                self._want_after = 0.0
                if held.unexpected and held.abort_on_unexpected:  # the failure is recorded: now stop
                    log.error("worker %s exits: task %s ended by %s (workerAbortWhenUncatchedException=true)",
                              self.id, held.task, held.unexpected)
                    self.exit_code = 1
                    self.stop_event.set()
        elif kind == "drop":
            held = self._held
            if held is not None and held.task == msg.get("task"):
                held.dropped = True
                if held.runner is not None:
                    held.runner.stop()
                self._held = None
                self._want_after = 0.0
        elif kind == "hello":  # the master restarted and asks who we are
            self._hello(sock)
        elif kind == "subtask":
            if not self.streams.start(msg):
                self._send(sock, "sub-busy", id=msg.get("id"), sub_free=self.streams.free)
        elif kind == "sub-ack":
            self.streams.acked(str(msg.get("id")))
        elif kind == "sub-cancel":
            self.streams.cancel(str(msg.get("id")))
        elif kind == "sub-drop":
            self.streams.drop(str(msg.get("id")))

    # ---- tasks ----------------------------------------------------------------------------------
    def _task_dir(self, job: str, task: str) -> Path:
        return self.workdir / "worker" / "jobs" / job / "tasks" / task

    def _start(self, msg: dict[str, Any]) -> None:
        if self._held is not None:  # one task at a time: hand it back at once
            self._send(self._sock, "release", task=msg["task"], lease=msg.get("lease"))
            return
        job, task = msg["job"], msg["task"]
        tdir = self._task_dir(job, task)
        tdir.mkdir(parents=True, exist_ok=True)
        atomic_write(tdir / "TASK", msg["manifest"])
        stats = Stats()
        held = Held(job, task, str(msg.get("lease", "")), time.time(), stats, threading.Thread(target=lambda: None),
                    abort_on_unexpected=bool(msg["spec"].get("abort_on_unexpected")))
        held.thread = threading.Thread(target=self._execute, args=(held, msg), name=f"task-{task[:8]}",
                                       daemon=True)
        self._held = held
        held.thread.start()

    def _runner(self, job: str, spec_dict: dict[str, Any]) -> TaskRunner:
        key = json.dumps(spec_dict, sort_keys=True)
        cached = self._runners.get(job)
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None:
            cached[1].close()
        runner = TaskRunner(JobSpec.from_dict(spec_dict), self.bucket)
        self._runners[job] = (key, runner)
        return runner

    def _execute(self, held: Held, msg: dict[str, Any]) -> None:
        try:
            _, entries = decode_manifest(msg["manifest"])
            runner = self._runner(held.job, msg["spec"])
            held.runner = runner
            result = runner.run(entries, held.stats, received=held.received)
        except OssimportError as exc:  # a task that cannot even start fails as a whole, with its cause
            log.error("task %s failed: %s: %s", held.task, exc.code, exc)
            result = TaskResult(False, {"files": 0, "failed": 0}, [f"FAILED\t\t{exc.code}: {exc}"], [])
        except Exception as exc:  # a bug, not the data: the task fails too, and the worker may stop
            held.unexpected = f"{type(exc).__name__}: {exc}"
            log.exception("task %s failed: unexpected %s", held.task, held.unexpected)
            result = TaskResult(False, {"files": 0, "failed": 0}, [f"FAILED\t\t{held.unexpected}"], [])
        held.result = result

    def _send_result(self, sock: zmq.Socket, held: Held) -> None:
        assert held.result is not None
        if held.dropped:
            return
        r = held.result
        self._send(sock, "result", job=held.job, task=held.task, lease=held.lease, ok=r.ok, done=r.done,
                   audit=r.audit, errors=r.errors)
        held.sent_at = time.monotonic()

    def _beat(self, sock: zmq.Socket) -> None:
        held = self._held
        tasks = [held.task] if held is not None else []
        leases = {held.task: held.lease} if held is not None else {}
        progress = {held.task: [held.stats.copied + held.stats.skipped, held.stats.bytes_moved]} if held else {}
        self._send(sock, "beat", tasks=tasks, leases=leases, progress=progress, subs=self.streams.progress(),
                   sub_free=self.streams.free)
