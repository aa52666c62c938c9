"""Wires a listing (or an explicit list of keys) to a pool of copy threads.

lister thread -> bounded queue -> `threads` workers, so copying starts while listing continues
and memory stays flat however many objects there are. Destination-only keys ("extras") are
spooled to a temporary file and deleted only after the copy phase, and only when nothing failed
(as rclone does: an incomplete listing must never turn into deletions).

One exception, on file-system destinations (local, SFTP) with --delete-dst: an extra that stands
in the way of a copy is deleted before that copy. A destination file `a` where the source now
has a directory (`a/b` is copied), or destination files under `a/` where the source now has a
file `a`: the listing proves the source does not have them as they are, so --delete-dst would
delete them afterwards anyway, and until then the copy fails (PathConflict). Without --delete-dst
that copy fails, one line per file.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import IO

from ossimport.engine import fanout
from ossimport.engine.listing import Filter, KeyRange, Pair, as_file_tree, checked_order, merge, ranged
from ossimport.engine.policy import Action, Policy
from ossimport.engine.stats import Stats
from ossimport.engine.transfer import Transfer, TransferOptions
from ossimport.errors import FATAL_CODES, OssimportError, StorageError
from ossimport.storage.base import Entry, Storage

log = logging.getLogger("ossimport")

_DONE = object()
# Listed items are handed to the workers in windows of this many, taking one directory after the
# other in turn: a listing is sorted, so otherwise every thread writes into the same directory at
# once, and file systems (the destination's, or the S3 server's disk) serialise creations in one
# directory; 16 threads creating 2,000 files spread over 20 directories take half the CPU and
# time they take in directory order here.
WINDOW = 1024
# destinations where a file `a` and a file `a/b` cannot both exist
_FILE_SYSTEMS = frozenset({"local", "sftp"})


@dataclass
class RunOptions:
    policy: Policy = field(default_factory=Policy)
    threads: int = 10
    # processes sharing the copies (engine/fanout.py); the threads are split among them. Only
    # for a run that lists (run()); 1 = this process alone
    processes: int = 1
    dryrun: bool = False
    delete_src: bool = False  # move: remove each source after its verified copy
    delete_dst: bool = False  # remove destination keys the source does not have
    # audit: compare only, copy nothing; a missing or different destination is a failure
    verify_only: bool = False
    verify_checksum: bool = False  # audit by content checksum, not only size
    filter: Filter = field(default_factory=Filter)
    key_range: KeyRange = field(default_factory=KeyRange)
    transfer: TransferOptions = field(default_factory=TransferOptions)


# (source entry, destination entry or None, destination key)
Item = tuple[Entry, Entry | None, str]
Listener = Callable[[str, Entry, str], None]  # (event, entry, detail): "copied", "failed", ...


class Runner:
    def __init__(self, src: Storage, dst: Storage, opts: RunOptions, stats: Stats | None = None,
                 listener: Listener | None = None) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.stats = stats or Stats()
        self.listener = listener
        self.transfer = Transfer(src, dst, opts.transfer, self.stats)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._fatal: StorageError | None = None  # a failure every further request would repeat
        self._spooled = 0  # extras written to the spool, to be deleted after the copy phase
        self._helpers: list[fanout.Helper] | None = None  # forked copy processes, once started
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
        log.info("copying with %d processes (threads: %s)", o.processes, "+".join(map(str, self._threads)))

    def run(self) -> Stats:
        """Compare the two roots by listing and copy what the policy says."""
        self.start_helpers()
        with tempfile.TemporaryFile("w+", encoding="utf-8") as extras:
            self._execute(self._items_from_listing(extras))
            for st in (self.src, self.dst):
                for problem in st.list_errors:
                    self.stats.fail("", "ListingIncomplete", f"{st.describe()}: {problem}")
                    self._emit("failed", Entry("", 0, 0.0), f"listing of {st.describe()} incomplete: {problem}")
            self._delete_extras(extras)
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
        needs_dst = self.opts.policy.needs_destination or self.opts.verify_only
        if not needs_dst:
            self._execute((e, None, e.key) for e in entries)
            return self.stats
        kr = KeyRange(entries[0].key, entries[-1].key)
        dst = checked_order(ranged(self.dst.list(start_after=kr.start_after()), kr), self.dst.describe())
        self._execute((s, d, s.key) for s, d in merge(entries, dst) if s is not None)
        return self.stats

    def stop(self) -> None:
        """Ask the run to finish early (Ctrl-C): no new copies start."""
        self._stop.set()

    # ---- listing side ---------------------------------------------------------------------------
    def _listing(self, st: Storage, count: bool) -> Iterator[Entry]:
        kr, flt = self.opts.key_range, self.opts.filter
        for e in checked_order(ranged(st.list(start_after=kr.start_after()), kr), st.describe()):
            if count:
                self.stats.add(found=1, found_bytes=e.size)
            if flt.active and not flt.admits(e.key):
                if count:
                    self.stats.add(excluded=1)
                continue
            yield e

    def _items_from_listing(self, extras: IO[str]) -> Iterator[Item]:
        src = self._listing(self.src, count=True)
        if self.dst.scheme in _FILE_SYSTEMS and not self.opts.verify_only:
            src = as_file_tree(src, self._not_a_file)
        pairs: Iterable[Pair]
        if self.opts.policy.needs_destination or self.opts.delete_dst or self.opts.verify_only:
            pairs = merge(src, self._listing(self.dst, count=False))
        else:
            pairs = ((s, None) for s in src)
        if self.opts.delete_dst and not self.opts.verify_only and self.dst.scheme in _FILE_SYSTEMS:
            yield from self._clearing_the_way(pairs, extras)
            return
        for s, d in pairs:
            if s is None:
                assert d is not None
                self._extra(d)
                if self.opts.delete_dst:
                    self._spool(extras, d.key)
                continue
            yield s, d, s.key

    def _extra(self, d: Entry) -> None:
        self.stats.add(extra=1)
        self._emit("extra", d, d.key)

    def _spool(self, extras: IO[str], key: str) -> None:
        extras.write(json.dumps(key) + "\n")
        self._spooled += 1

    def _clearing_the_way(self, pairs: Iterable[Pair], extras: IO[str]) -> Iterator[Item]:
        """The items of a merged listing (with --delete-dst onto a file system), deleting first
        the extras that would block a copy: a destination file that is a directory of a copied
        key, or the destination files under a copied file's name.

        Keys that may still turn out to be such a directory are kept on a stack until the merge
        has passed every key under them: a source file missing at the destination is handed out
        only then (after the extras under its name are gone), a destination extra spooled only
        then (unless it was deleted already). The stack holds only keys that are prefixes of the
        current one (`a`, `a.old`, `a.old/x`), so memory stays flat."""
        stack: list[_Pending] = []

        def close(key: str | None) -> Iterator[Item]:
            # every key under stack[-1].key/ sorts in [key + "/", key + "0"): past it, none follows
            while stack and (key is None or key >= stack[-1].end):
                done = stack.pop()
                if done.item is not None:
                    yield done.item
                elif not done.cleared:
                    self._spool(extras, done.key)

        try:
            for s, d in pairs:
                key = s.key if s is not None else d.key if d is not None else ""
                yield from close(key)
                if d is not None and s is None:
                    self._extra(d)
                cleared = False
                for p in stack:
                    if not key.startswith(p.key + "/"):
                        continue
                    if p.item is None and s is not None and not p.cleared:
                        # the destination file p.key is where the source now has a directory
                        p.cleared = self._clear(p.key, key)
                    elif p.item is not None and s is None and not cleared:
                        # a destination file under p.key/, where the source now has a file p.key
                        cleared = self._clear(key, p.key)
                if s is None:
                    if not cleared:
                        stack.append(_Pending(key, key + "0"))
                elif d is None:
                    stack.append(_Pending(key, key + "0", item=(s, None, key)))
                else:
                    yield s, d, key
        except OssimportError:
            yield from close(None)  # what was listed before a failure is still copied
            raise
        yield from close(None)

    def _clear(self, extra: str, blocked: str) -> bool:
        """Delete the destination extra `extra` now, before the copy of `blocked` it stands in the
        way of. Not while the source listing has left anything out (then it is not known that
        the source has no `extra`): the copy fails instead. True when it was deleted or tried."""
        if self.src.list_errors or self._stop.is_set():
            return False
        log.debug("deleting %s first: it is in the way of %s", extra, blocked)
        try:
            self._delete(self.dst, Entry(extra, 0, 0.0), "deleted")
        except StorageError as exc:
            self.stats.fail(extra, exc.code, f"delete failed: {exc}")
            self._emit("failed", Entry(extra, 0, 0.0), f"{exc.code}: delete failed (it is in the way of "
                                                       f"{blocked}): {exc}")
            return True  # not again for the next key; the failure also cancels the other deletions
        return True

    def _delete(self, st: Storage, entry: Entry, event: str) -> None:
        """Delete `entry` from `st` and count it; a dry run only counts it, as would_delete."""
        if self.opts.dryrun:
            self.stats.add(would_delete=1)
        else:
            st.delete(entry.key)
            self.stats.add(deleted=1)
        self._emit(event, entry, entry.key)

    # ---- the pipeline -----------------------------------------------------------------------------
    def _execute(self, items: Iterator[Item]) -> None:
        # SimpleQueue: put and get are C calls, ~15 us per file cheaper than queue.Queue, whose
        # Conditions wake threads through Python code. It has no bound, so the lister waits
        # (in short sleeps) once `limit` items are queued until half are taken: memory stays flat.
        if not (self.opts.verify_only or self.opts.delete_src):
            items = self._skipping_identical(items)
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        limit = max(64, self.opts.threads * 4)
        helpers, self._helpers = self._helpers or [], []  # each run hands its items out once
        workers = [threading.Thread(target=self._work, args=(q,), name=f"copy-{i}", daemon=True)
                   for i in range(self._threads[0] if helpers else max(1, self.opts.threads))]
        workers += [threading.Thread(target=fanout.forward, name=f"helper-{h.pid}", daemon=True,
                                     args=(h, q, _DONE, self.stats, self._emit, self._stop, self._handle,
                                           lambda: self._work(q)))
                    for h in helpers]
        for w in workers:
            w.start()
        threads = max(1, self.opts.threads)
        window: list[Item] = []

        def feed(batch: list[Item]) -> None:
            for item in _interleaved(batch) if threads > 1 else batch:
                if self._stop.is_set():
                    return
                if q.qsize() >= limit:
                    while q.qsize() > limit // 2 and not self._stop.is_set():
                        time.sleep(0.005)
                q.put(item)

        try:
            for item in items:
                if self._stop.is_set():
                    break
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
            for w in workers:
                w.join()
            self.transfer.close()

    def _not_a_file(self, src: Entry, child: str) -> None:
        """A source key a file-system destination cannot hold as a file (see `as_file_tree`)."""
        dst_key = src.key
        if not child:  # a directory marker: the directory is made by the files in it
            if src.size:
                log.warning("not copying the %d bytes of the directory marker %s: a file system keeps a "
                            "directory, not content, under that name", src.size, dst_key)
            self.stats.add(skipped=1)
            self._emit("skipped", src, dst_key)
            return
        try:
            self.dst.check_name(dst_key)  # a name the destination refuses anyway (`..`) says so
        except StorageError as exc:
            code, message = exc.code, str(exc)
        else:
            code = "PathConflict"
            message = (f"{dst_key} is a file and also a directory at the source (it holds {child}): a file "
                       "system cannot hold both, so the directory was copied and this file was not; rename one")
        self.stats.fail(src.key, code, message, src.size)
        self._emit("failed", src, f"{code}: {message}")

    def _skipping_identical(self, items: Iterator[Item]) -> Iterator[Item]:
        """The items that need work: a pair the policy skips from the listings alone (same size
        and mtime) is counted here, without a hand-off to a copy thread or process. A no-op
        sync of 100,000 files is all such pairs."""
        decide, skip = self.opts.policy.decide, Action.SKIP
        for item in items:
            src, dst, dst_key = item
            if dst is not None and decide(src, dst) is skip:
                self.stats.add(skipped=1)
                self._emit("skipped", src, dst_key)
            else:
                yield item

    def _work(self, q: queue.SimpleQueue[object]) -> None:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if not self._stop.is_set():
                self._handle(item)  # type: ignore[arg-type]

    def _handle(self, item: Item) -> None:
        """One item, its outcome counted and reported: never raises."""
        src, dst, dst_key = item
        fatal = self._fatal
        if fatal is not None:
            # failed without a request: listeners that keep per-file records (jobs) get it
            # as a failure to retry; the CLI counts these instead of printing each
            self.stats.fail(src.key, fatal.code, f"not tried after {fatal.code}", src.size)
            self.stats.add(not_tried=1)
            self._emit("not-tried", src, f"{fatal.code}: not tried after an earlier file failed with it")
            return
        try:
            self._one(src, dst, dst_key)
        except StorageError as exc:
            if exc.code in FATAL_CODES and self._fatal is None:
                self._fatal = exc
            self.stats.fail(src.key, exc.code, str(exc), src.size)
            self._emit("failed", src, f"{exc.code}: {exc}")
        except Exception as exc:  # a bug or an unmapped library error: fail the file, not the run
            log.debug("unexpected error on %s", src.key, exc_info=True)
            self.stats.fail(src.key, type(exc).__name__, str(exc), src.size)
            self._emit("failed", src, f"{type(exc).__name__}: {exc}")

    def _one(self, src: Entry, dst: Entry | None, dst_key: str) -> None:
        if self.opts.verify_only:
            self._verify_one(src, dst)
            return
        action = self.opts.policy.decide(src, dst)
        if action is Action.COMPARE:
            assert dst is not None
            action = Action.SKIP if self.transfer.same_content(src, dst) else Action.COPY
        if action is Action.SKIP:
            self.stats.add(skipped=1)
            self._emit("skipped", src, dst_key)
        else:
            self.dst.check_name(dst_key)
            copied = src
            if not self.opts.dryrun:
                # the size copied (and checked): a file may have grown or shrunk since it was listed
                copied = replace(src, size=self.transfer.copy(src, dst_key).size)
            self.stats.add(copied=1, copied_bytes=copied.size)
            self._emit("copied", copied, dst_key)
        if self.opts.delete_src:
            self._delete(self.src, src, "deleted-source")

    def _verify_one(self, src: Entry, dst: Entry | None) -> None:
        if dst is None:
            raise StorageError(f"{src.key!r} is missing at the destination", code="MISSING_AT_DESTINATION")
        if dst.size != src.size:
            raise StorageError(f"{src.key!r}: destination has {dst.size} bytes, source {src.size}",
                               code="SIZE_NOT_MATCH")
        if self.opts.verify_checksum and not self.transfer.same_content(src, dst):
            raise StorageError(f"{src.key!r}: content differs", code="CHECKSUM_NOT_MATCH")
        self.stats.add(skipped=1)
        self._emit("verified", src, src.key)

    def _delete_extras(self, extras: IO[str]) -> None:
        if not self.opts.delete_dst or not self._spooled:
            return
        if self.stats.failed or self._errors or self._stop.is_set():
            log.error("not deleting %d extra destination files because there were errors", self._spooled)
            return
        extras.seek(0)
        self._delete_keys(json.loads(line) for line in extras)

    def _delete_keys(self, keys: Iterator[str]) -> None:
        slots = threading.BoundedSemaphore(max(1, self.opts.threads) * 4)  # bounded, like the copy queue

        def delete(key: str) -> None:
            try:
                self._delete(self.dst, Entry(key, 0, 0.0), "deleted")
            except StorageError as exc:
                self.stats.fail(key, exc.code, f"delete failed: {exc}")
                self._emit("failed", Entry(key, 0, 0.0), f"{exc.code}: delete failed: {exc}")
            finally:
                slots.release()

        with ThreadPoolExecutor(max(1, self.opts.threads)) as pool:
            for key in keys:
                slots.acquire()
                pool.submit(delete, key)

    def _emit(self, event: str, entry: Entry, detail: str) -> None:
        if self.listener is not None:
            self.listener(event, entry, detail)


@dataclass(slots=True)
class _Pending:
    """A key the merge may still find to be a directory on the other side (see
    `Runner._clearing_the_way`): a source file waiting to be handed out (`item`), or a destination
    extra waiting to be spooled (`cleared`: already deleted, or tried)."""

    key: str
    end: str  # key + "0": the first key after every key under key/
    item: Item | None = None
    cleared: bool = False


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
