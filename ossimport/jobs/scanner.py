"""Scanning a job's source into tasks: ranges of the key space, in parallel, each checkpointed.

With scanThreadCount > 1 the key space is cut at the directories found down to
maxMultiThreadScanDepth levels: ["", "a/"), ["a/", "a/x/"), ["a/x/", "b/"), ["b/", end). Every
key falls in exactly one range, whatever the tree looks like, and each range is listed with
`list(start_after=...)` by its own thread. A range remembers its last key and task number in
`checkpoints/range-p<pass>-<N>.json`; a task is written (one rename) before the checkpoint that
counts it, and its name derives from (job, submission, pass, range, number). A scan killed between
the two finds the task when it resumes and goes on after the key range *recorded in the task*,
never after what a new listing puts in the same batch (the source may have changed meanwhile), so
no key falls between two tasks and none is in two. The ranges themselves are fixed in `scan.json`
when a pass starts.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ossimport.engine.listing import checked_order, merge
from ossimport.engine.policy import Action, Policy
from ossimport.errors import StorageError
from ossimport.jobs.crashpoint import crashpoint
from ossimport.jobs.execute import JobSpec
from ossimport.jobs.store import JobDir, TaskHeader, atomic_write, read_header, task_digest, task_name
from ossimport.storage import open_storage
from ossimport.storage.base import Entry, Storage

MAX_RANGES = 4096  # more ranges than this buys no parallelism, only checkpoint files


@dataclass
class JobPlan:
    """What the master needs of a job's config to scan it."""

    spec: JobSpec
    count_limit: int = 10000
    size_limit: int = 1_000_000_000
    import_since: int = 0
    incremental: bool = False
    interval: float = 86400.0
    scan_threads: int = 1
    scan_depth: int = 1


def plan_ranges(src: Storage, threads: int, depth: int) -> list[list[str]]:
    """[lo, hi) key ranges (hi "" = to the end) cut at directories down to `depth` levels."""
    if threads <= 1:
        return [["", ""]]
    bounds: set[str] = set()
    level = [""]
    try:
        for _ in range(max(depth, 1)):
            below: list[str] = []
            for prefix in level:
                below.extend(src.list_dirs(prefix))
                if len(bounds) + len(below) >= MAX_RANGES:
                    break
            bounds.update(below)
            level = below
            if len(bounds) >= MAX_RANGES:
                break
    except StorageError as exc:
        if exc.code != "NotImplemented":
            raise
        return [["", ""]]  # a backend that cannot list one level is scanned as one range
    edges = ["", *sorted(bounds)]
    return [[lo, edges[i + 1] if i + 1 < len(edges) else ""] for i, lo in enumerate(edges)]


class Scanner:
    """One pass over a job's source. Call `run()`; it returns when the pass is fully cut."""

    def __init__(self, jdir: JobDir, plan: JobPlan, on_task: Callable[[str], None],
                 stopped: Callable[[], bool], log: Callable[[str], None]) -> None:
        self.jdir = jdir
        self.plan = plan
        self.on_task = on_task
        self.stopped = stopped
        self.log = log

    def run(self) -> None:
        plan = self.plan
        src = open_storage(plan.spec.src, plan.spec.src_options)
        try:
            cp = self.jdir.read_checkpoint()
            self.pass_no = int(cp["pass"])
            self.job_id = self.jdir.read_id()
            self.jdir.sweep_ranges(self.pass_no)  # a kill inside next_pass may have left old ones
            if not cp.get("ranges"):
                cp["ranges"] = plan_ranges(src, plan.scan_threads, plan.scan_depth)
                self.jdir.write_checkpoint(cp)
            ranges = cp["ranges"]
            todo: queue.Queue[int] = queue.Queue()
            for i in range(len(ranges)):
                state = self._range_state(i)
                if not state.get("done"):
                    self._recover(i, self.pass_no, state)
                    todo.put(i)
            self.jdir.drop_index()  # built by _recover; the ranges' own checkpoints say the rest
            errors: list[BaseException] = []
            threads = [threading.Thread(target=self._work, args=(todo, ranges, cp, errors), daemon=True)
                       for _ in range(max(1, min(plan.scan_threads, todo.qsize())))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            if self.stopped():
                return
            for problem in src.list_errors:
                self.log(f"listing incomplete: {problem}")
            cp = self.jdir.read_checkpoint()
            cp["done"] = True
            self.jdir.write_checkpoint(cp)
            tasks = sum(self._range_state(i).get("seq", 0) for i in range(len(ranges)))
            self.log(f"scan of pass {cp['pass']} finished: {len(ranges)} ranges, {tasks} tasks")
        finally:
            src.close()

    # ---- one range ------------------------------------------------------------------------------
    def _range_path(self, i: int) -> Any:
        return self.jdir.range_path(self.pass_no, i)

    def _range_state(self, i: int) -> dict[str, Any]:
        try:
            return json.loads(self._range_path(i).read_text())
        except FileNotFoundError:
            return {"seq": 0, "last_key": "", "done": False}

    def _work(self, todo: queue.Queue[int], ranges: list[list[str]], cp: dict[str, Any],
              errors: list[BaseException]) -> None:
        plan = self.plan
        src = open_storage(plan.spec.src, plan.spec.src_options)
        dst = open_storage(plan.spec.dst, plan.spec.dst_options)
        try:
            while not self.stopped() and not errors:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                self._scan_range(i, ranges[i][0], ranges[i][1], cp["pass"], src, dst)
        except BaseException as exc:  # the master logs it and starts the scan again later
            errors.append(exc)
        finally:
            src.close()
            dst.close()

    def _scan_range(self, i: int, lo: str, hi: str, pass_no: int, src: Storage, dst: Storage) -> None:
        state = self._range_state(i)
        batch: list[Entry] = []
        size = 0
        for e in self._candidates(src, dst, lo, hi, state["last_key"], pass_no):
            batch.append(e)
            size += e.size
            if len(batch) >= self.plan.count_limit or size >= self.plan.size_limit:
                self._cut(i, pass_no, state, batch, size)
                batch, size = [], 0
            if self.stopped():
                return
        if batch:
            self._cut(i, pass_no, state, batch, size)
        state["done"] = True
        atomic_write(self._range_path(i), json.dumps(state))

    def _listing(self, st: Storage, lo: str, hi: str, last_key: str) -> Iterator[Entry]:
        # a proper prefix of `lo` sorts below it: the few keys between are dropped here
        after = max(last_key, lo[:-1])
        for e in checked_order(st.list(start_after=after), st.describe()):
            if hi and e.key >= hi:
                return
            if e.key >= lo and e.key > last_key:
                yield e

    def _candidates(self, src: Storage, dst: Storage, lo: str, hi: str, last_key: str,
                    pass_no: int) -> Iterator[Entry]:
        plan = self.plan
        listing = self._listing(src, lo, hi, last_key)
        if plan.import_since:
            listing = (e for e in listing if e.mtime > plan.import_since)
        if not (pass_no > 1 or plan.spec.skip_existing) or plan.spec.job_type == "audit":
            yield from listing
            return
        # later passes of an incremental job, and isSkipExistFile: only what the destination lacks
        policy = Policy("sync", skip_existing=plan.spec.skip_existing)
        for s, d in merge(listing, self._listing(dst, lo, hi, last_key)):
            if s is not None and policy.decide(s, d) is Action.COPY:
                yield s

    def _recover(self, i: int, pass_no: int, state: dict[str, Any]) -> None:
        """Tasks written just before a kill, whose checkpoint was not: count them and go on after
        the keys they cover (as recorded in them, not as a new listing would cut them)."""
        while True:
            name = task_name(self.jdir.name, pass_no, state["seq"] + 1, unit=i, job_id=self.job_id)
            found = self.jdir.find(task_digest(name))
            if found is None:
                return
            header = read_header(found / "TASK")
            state.update({"seq": header.seq, "last_key": header.upto})
            atomic_write(self._range_path(i), json.dumps(state))
            self.log(f"range {i}: task {header.seq} was written before the scan stopped; "
                     f"going on after {header.upto!r}")

    def _cut(self, i: int, pass_no: int, state: dict[str, Any], batch: list[Entry], size: int) -> None:
        jdir = self.jdir
        seq = state["seq"] + 1
        name = task_name(jdir.name, pass_no, seq, unit=i, job_id=self.job_id)
        last = batch[-1].key
        header = TaskHeader(jdir.name, name, pass_no, seq, len(batch), size, batch[0].key, last, upto=last)
        jdir.add_task(header, batch)
        crashpoint("scan.task-written")
        self.on_task(name)
        state.update({"seq": seq, "last_key": last})
        atomic_write(self._range_path(i), json.dumps(state))
