"""The execution stage of a run: a pool of copy threads (and copy processes) working through the
items the planner hands out.

planner (listing + merge + policy) -> bounded queue -> `threads` workers -> deletion stage, so
copying starts while listing continues and memory stays flat however many objects there are.
One cancel token stops all three: `stop()` (Ctrl-C, a job's lease lost) sets it, the planner
draws no further key, no worker starts a further item, copies in hand are abandoned at their
next chunk or bandwidth-limit wait (their temp files and multipart uploads removed on the way
out), nothing more is deleted, and the run returns within a short grace period whatever is
still in flight.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

from ossimport.engine import fanout
from ossimport.engine.cancel import Cancelled, CancelToken
from ossimport.engine.deletion import Deleter, Spool
from ossimport.engine.options import Item, RunOptions
from ossimport.engine.outcome import Kind, Listener, Outcome
from ossimport.engine.planner import Planner
from ossimport.engine.policy import Action
from ossimport.engine.stats import Stats
from ossimport.engine.transfer import Transfer
from ossimport.errors import FATAL_CODES, UNREACHABLE_CODES, OssimportError, StorageError
from ossimport.storage.base import Entry, Storage

__all__ = ["Item", "Listener", "RunOptions", "Runner"]

log = logging.getLogger("ossimport")

_DONE = object()
# Listed items are handed to the workers in windows of this many, taking one directory after the
# other in turn: a listing is sorted, so otherwise every thread writes into the same directory at
# once, and file systems (the destination's, or the S3 server's disk) serialise creations in one
# directory; 16 threads creating 2,000 files spread over 20 directories take half the CPU and
# time they take in directory order here.
WINDOW = 1024
# after a stop, how long the run waits for copies in flight to notice it (a request in flight
# ends only with its answer or the timeout); then it returns and leaves them to the process exit
CANCEL_GRACE = 1.0


class Runner:
    def __init__(self, src: Storage, dst: Storage, opts: RunOptions, stats: Stats | None = None,
                 listener: Listener | None = None, cancel: CancelToken | None = None) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.stats = stats or Stats()
        self.listener = listener
        self.cancel = cancel or CancelToken()
        self.transfer = Transfer(src, dst, opts.transfer, self.stats, self.cancel)
        self._deleter = Deleter(src, dst, opts, self.stats, self._emit, self.cancel)
        self._planner = Planner(src, dst, opts, self.stats, self._emit, self.cancel, self._deleter)
        self._errors: list[BaseException] = []
        # the code of a failure every further request would repeat (wrong keys, no such bucket, an
        # endpoint never reached): the rest of the run fails without a request each
        self._fatal: str | None = None
        self._fatal_lock = threading.Lock()
        self._reached = False  # an item succeeded: the stores can be reached
        self._helpers: list[fanout.Helper] | None = None  # forked copy processes, once started
        self._forked: list[fanout.Helper] = []  # told to stop with the run
        self._threads = [max(1, opts.threads)]  # copy threads per process, this one first

    # ---- entry points ---------------------------------------------------------------------------
    def start_helpers(self) -> None:
        """Fork the copy processes of `opts.processes` now: before the caller starts any thread
        of its own (a progress display). run() calls it if the caller did not."""
        if self._helpers is not None:
            return
        self._helpers = []
        o = self.opts
        if (o.processes < 2 or o.dryrun or o.transfer.bucket is not None or not hasattr(os, "fork")
                or not (self.src.can_reopen() and self.dst.can_reopen())):
            return  # a bandwidth limit is one token bucket, which cannot span processes
        if threading.active_count() > 1:
            # a fork copies only this thread: a lock another one holds would never be released in
            # the child (an embedding program, a test runner); copy in this process alone
            log.debug("not forking copy processes: %d threads are running", threading.active_count())
            return
        self._threads = fanout.split(o.threads, o.processes)

        # parts of a multipart upload are held in memory: helpers get a share of the part threads.
        # Ranges of a download stream through 1 MiB at a time: every process gets them all
        # (161 mixed files, S3 -> local: 2 per helper 5.25 s, 4 per helper 4.46 s, rclone 4.14 s)
        parts = o.transfer.part_threads
        if self.dst.abilities.multipart:
            parts = max(2, parts // o.processes)

        def make_runner(src: Storage, dst: Storage, stats: Stats, threads: int, listener: Listener) -> Runner:
            opts = replace(o, threads=threads, processes=1, delete_dst=False,
                           transfer=replace(o.transfer, part_threads=parts))
            return Runner(src, dst, opts, stats, listener)

        self._helpers = fanout.start(o.processes - 1, self.src, self.dst, self._threads[1:], make_runner)
        self._forked = list(self._helpers)
        log.info("copying with %d processes (threads: %s)", o.processes, "+".join(map(str, self._threads)))

    def run(self) -> Stats:
        """Compare the two roots by listing and copy what the policy says."""
        self.start_helpers()
        extras = Spool()
        try:
            self._execute(self._planner.from_listing(extras))
            if self.cancel.cancelled:
                return self.stats
            for st in (self.src, self.dst):
                for problem in st.list_errors:
                    self.stats.fail("", "ListingIncomplete", f"{st.describe()}: {problem}")
                    self._emit(Outcome(Kind.FAILED, "", code="ListingIncomplete",
                                       message=f"listing of {st.describe()} incomplete: {problem}"))
            self._deleter.extras(extras, failed=bool(self.stats.failed or self._errors))
            self._deleter.old_temps()
        finally:
            extras.close()
        return self.stats

    def run_items(self, items: Iterable[Item]) -> Stats:
        """Copy an explicit list of (source entry, destination entry or None, destination key):
        single-object copies and job tasks. The policy still decides per item."""
        self._execute(iter(items))
        return self.stats

    def run_manifest(self, entries: list[Entry]) -> Stats:
        """Copy a job task's files: the manifest is merged with a listing of the destination over
        the task's key range (one LIST per page instead of one HEAD per file)."""
        if not entries:
            return self.stats
        self.stats.add(found=len(entries), found_bytes=sum(e.size for e in entries))
        self._execute(self._planner.from_manifest(entries))
        # jobs remove the temp files of their tasks' keys themselves (remove_stale_temps); a
        # worker keeps its storages from task to task, so what the listing met is not kept
        self.dst.old_temps.clear()
        return self.stats

    def stop(self) -> None:
        """Stop the run (Ctrl-C, a job's lease lost): nothing new starts, copies in hand are
        abandoned, and the copy processes are told the same."""
        self.cancel.cancel()
        for helper in self._forked:
            fanout.terminate(helper)

    @property
    def cancelled(self) -> bool:
        return self.cancel.cancelled

    # ---- the pipeline -----------------------------------------------------------------------------
    def _execute(self, items: Iterator[Item]) -> None:
        # SimpleQueue: put and get are C calls, ~15 us per file cheaper than queue.Queue, whose
        # Conditions wake threads through Python code. It has no bound, so the lister waits
        # (in short sleeps) once `limit` items are queued until half are taken: memory stays flat.
        items = self._planner.needing_work(items)
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        limit = max(64, self.opts.threads * 4)
        helpers, self._helpers = self._helpers or [], []  # each run hands its items out once
        workers = [threading.Thread(target=self._work, args=(q,), name=f"copy-{i}", daemon=True)
                   for i in range(self._threads[0] if helpers else max(1, self.opts.threads))]
        parent = fanout.Parent(q, _DONE, self.stats, self._emit, self._helper_outcome, self.cancel,
                               self._handle, lambda: self._work(q), self._stores_answered,
                               lambda: self._fatal is not None)
        workers += [threading.Thread(target=fanout.forward, name=f"helper-{h.pid}", daemon=True,
                                     args=(h, parent)) for h in helpers]
        for w in workers:
            w.start()
        threads = max(1, self.opts.threads)
        window: list[Item] = []

        cancel = self.cancel

        def feed(batch: list[Item]) -> None:
            for item in _interleaved(batch) if threads > 1 else batch:
                if cancel.cancelled:
                    return
                if q.qsize() >= limit:
                    while q.qsize() > limit // 2 and not cancel.cancelled:
                        time.sleep(0.005)
                q.put(item)

        try:
            for item in items:
                window.append(item)
                # a full window is handed out interleaved; a part of one when the workers run short
                if len(window) >= WINDOW or q.qsize() < threads:
                    feed(window)
                    window = []
        except OssimportError as exc:
            self._errors.append(exc)
            log.error("listing failed: %s", exc)
            self.stats.fail("", exc.code, f"listing failed: {exc}")
        finally:
            feed(window)  # what was listed before a failure is still copied
            self.stats.listing_done = True
            for _ in workers:
                q.put(_DONE)
            if self._joined(workers):
                self.transfer.close()
                self._forked = []  # every helper was reaped: nothing signals them any more
                fanout.release(helpers)

    def _joined(self, workers: list[threading.Thread]) -> bool:
        """Wait for the workers; after a stop, for CANCEL_GRACE at most (a copy in flight notices
        the stop at its next chunk, a request in flight only at its answer). False when some were
        left running: the process exit ends them (daemon threads), and what they leave behind
        are temp files that the next run removes."""
        deadline: float | None = None
        for w in workers:
            while True:
                w.join(0.05 if deadline is None else max(0.0, deadline - time.monotonic()))
                if not w.is_alive():
                    break
                if self.cancel.cancelled:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + CANCEL_GRACE
                    elif now >= deadline:
                        log.info("stopped with copies still in flight")
                        return False
        return True

    def _work(self, q: queue.SimpleQueue[object]) -> None:
        while True:
            item = q.get()
            if item is _DONE:
                return
            self._handle(item)  # type: ignore[arg-type]

    def _handle(self, item: Item) -> None:
        """One item, its outcome counted and reported: never raises."""
        if self.cancel.cancelled:
            return  # a stopped run starts nothing new: the item is neither copied nor failed
        src, dst, dst_key = item
        fatal = self._fatal
        if fatal is not None:
            # failed without a request: listeners that keep per-file records (jobs) get it
            # as a failure to retry; the CLI counts these instead of printing each
            self._not_tried(src, fatal, "not tried after an earlier file failed with it")
            return
        try:
            self._one(src, dst, dst_key)
            self._reached = True
        except Cancelled:
            return  # abandoned mid-copy by a stop: not copied, not a failure
        except StorageError as exc:
            if self._stops_the_run(exc.code) == "again":
                # in flight when an earlier file failed this way: counted with the files not
                # tried, not a line of its own (one wrong key, one FAILED line)
                self._not_tried(src, exc.code, "failed like an earlier file", str(exc))
                return
            self.stats.fail(src.key, exc.code, str(exc), src.size)
            self._emit(Outcome(Kind.FAILED, src.key, src.size, exc.code, str(exc)))
        except Exception as exc:  # a bug or an unmapped library error: fail the file, not the run
            log.debug("unexpected error on %s", src.key, exc_info=True)
            self.stats.fail(src.key, type(exc).__name__, str(exc), src.size)
            self._emit(Outcome(Kind.FAILED, src.key, src.size, type(exc).__name__, str(exc)))

    def _stops_the_run(self, code: str) -> str:
        """"first" when a failure with `code` is the first that every further request would
        repeat (it stops the run), "again" when the run was stopped by a failure with the same
        code, "" otherwise. An unreachable endpoint stops the run only while nothing has
        succeeded yet: later, a refused connection is an outage that retries ride out."""
        with self._fatal_lock:
            if self._fatal is not None:
                return "again" if code == self._fatal else ""
            if code in FATAL_CODES or (code in UNREACHABLE_CODES and not self._stores_answered()):
                self._fatal = code
                return "first"
            return ""

    def _stores_answered(self) -> bool:
        """Whether anything in this run reached the stores: an item succeeded, or the destination
        answered a listing (a copy process learns it from the parent with its items)."""
        return self._reached or self._planner.dst_listed

    def reached(self) -> None:
        """The stores answered (told to a copy process by the parent)."""
        self._reached = True

    def _not_tried(self, src: Entry, code: str, why: str, message: str = "") -> None:
        self.stats.fail(src.key, code, message or f"not tried after {code}", src.size)
        self.stats.add(not_tried=1)
        self._emit(Outcome(Kind.NOT_TRIED, src.key, src.size, code, why))

    def _helper_outcome(self, outcome: Outcome) -> Outcome:
        """An outcome of a copy process (engine/fanout.py) as this run reports it, decided like
        `_handle`: a failure like the one that stopped the run (in this process or another) is
        one of the files not tried, so all processes together print one line."""
        if outcome.kind in (Kind.COPIED, Kind.SKIPPED, Kind.VERIFIED):
            self._reached = True
        elif outcome.kind is Kind.FAILED and self._stops_the_run(outcome.code) == "again":
            self.stats.add(not_tried=1)
            return replace(outcome, kind=Kind.NOT_TRIED)
        return outcome

    def _one(self, src: Entry, dst: Entry | None, dst_key: str) -> None:
        if self.opts.verify_only:
            self._verify_one(src, dst)
            return
        policy = self.opts.policy
        action = policy.decide(src, dst)
        moving_skip = action is Action.SKIP and self.opts.delete_src
        if action is Action.COMPARE or moving_skip:
            # a move deletes the source: size and time ("same size, destination not older") prove
            # nothing, only a checksum of one kind from both sides (hashed where none is reported)
            assert dst is not None
            same = self.transfer.same_content(src, dst)
            if moving_skip and not same and (policy.update or policy.skip_existing):
                raise StorageError(f"{src.key!r}: the destination holds other bytes and "
                                   f"{'--update' if policy.update else 'skip-existing'} keeps it; the source "
                                   "is not deleted", code="DESTINATION_DIFFERS")
            action = Action.SKIP if same else Action.COPY
        if action is Action.SKIP:
            self.stats.add(skipped=1)
            self._emit(Outcome(Kind.SKIPPED, src.key, src.size))
        else:
            self.dst.check_name(dst_key)
            result = None if self.opts.dryrun else self.transfer.copy(src, dst_key)
            # the size copied (and checked): a file may have grown or shrunk since it was listed
            size = result.size if result is not None else src.size
            self.stats.add(copied=1, copied_bytes=size)
            checksums = dict(result.checksums) if result else {}
            self._emit(Outcome(Kind.COPIED, src.key, size, checksums=checksums))
        if self.opts.delete_src:
            self._deleter.delete(self.src, src.key, Kind.DELETED_SOURCE, src.size)

    def _verify_one(self, src: Entry, dst: Entry | None) -> None:
        if dst is None:
            raise StorageError(f"{src.key!r} is missing at the destination", code="MISSING_AT_DESTINATION")
        if dst.size != src.size:
            raise StorageError(f"{src.key!r}: destination has {dst.size} bytes, source {src.size}",
                               code="SIZE_NOT_MATCH")
        if self.opts.verify_checksum and not self.transfer.same_content(src, dst):
            raise StorageError(f"{src.key!r}: content differs", code="CHECKSUM_NOT_MATCH")
        self.stats.add(skipped=1)
        self._emit(Outcome(Kind.VERIFIED, src.key, src.size))

    def _emit(self, outcome: Outcome) -> None:
        if self.listener is not None:
            self.listener(outcome)



def _interleaved(batch: list[Item]) -> list[Item]:
    """The items of `batch` round-robin over their destination directories, each directory's
    items in their listed order."""
    groups: dict[str, list[Item]] = {}
    for item in batch:
        groups.setdefault(item[2].rpartition("/")[0], []).append(item)
    if len(groups) < 2:
        return batch
    lists = list(groups.values())
    return [g[i] for i in range(max(map(len, lists))) for g in lists if i < len(g)]
