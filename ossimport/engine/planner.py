"""The planning stage of a run: listings merged into the items that need work.

Both sides are listed as sorted streams (filters and the key range applied) and merged; a pair
the policy skips from the listings alone is counted here, a destination extra is counted and
spooled for the deletion stage, and everything else is handed on as an item for the copy
threads. Planning stops at the run's cancel token before it draws the next key.

One exception, on file-system destinations (local, SFTP) with --delete-dst: an extra that stands
in the way of a copy is deleted before that copy. A destination file `a` where the source now
has a directory (`a/b` is copied), or destination files under `a/` where the source now has a
file `a`: the listing proves the source does not have them as they are, so --delete-dst would
delete them afterwards anyway, and until then the copy fails (PathConflict). Without --delete-dst
that copy fails, one line per file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ossimport.engine.cancel import CancelToken
from ossimport.engine.deletion import Deleter, Spool
from ossimport.engine.listing import KeyRange, Pair, as_file_tree, checked_order, merge, ranged
from ossimport.engine.options import Item, RunOptions
from ossimport.engine.outcome import Kind, Listener, Outcome
from ossimport.engine.policy import Action
from ossimport.engine.stats import Stats
from ossimport.errors import OssimportError, StorageError
from ossimport.storage.base import Entry, Storage

log = logging.getLogger("ossimport")

# destinations where a file `a` and a file `a/b` cannot both exist
_FILE_SYSTEMS = frozenset({"local", "sftp"})


class Planner:
    def __init__(self, src: Storage, dst: Storage, opts: RunOptions, stats: Stats, emit: Listener,
                 cancel: CancelToken, deleter: Deleter) -> None:
        self.src, self.dst, self.opts, self.stats = src, dst, opts, stats
        self._emit = emit
        self._cancel = cancel
        self._deleter = deleter
        self.dst_listed = False  # the destination answered a listing: it can be reached

    def from_listing(self, extras: Spool) -> Iterator[Item]:
        """The items of the two roots' merged listings; extras go to `extras` (--delete-dst)."""
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
                    extras.add(d.key)
                continue
            yield s, d, s.key

    def from_manifest(self, entries: list[Entry]) -> Iterator[Item]:
        """A job task's files, merged with a listing of the destination over the task's key range
        when the policy needs it (one LIST per page instead of one HEAD per file)."""
        if not (self.opts.policy.needs_destination or self.opts.verify_only):
            yield from ((e, None, e.key) for e in entries)
            return
        kr = KeyRange(entries[0].key, entries[-1].key)
        dst = checked_order(ranged(self.dst.list(start_after=kr.start_after()), kr), self.dst.describe())
        yield from ((s, d, s.key) for s, d in merge(entries, dst) if s is not None)

    def needing_work(self, items: Iterator[Item]) -> Iterator[Item]:
        """The items that need work, until the run is stopped: a pair the policy skips from the
        listings alone (same size and mtime) is counted here, without a hand-off to a copy thread
        or process. A no-op sync of 100,000 files is all such pairs."""
        check = not (self.opts.verify_only or self.opts.delete_src)
        decide, skip = self.opts.policy.decide, Action.SKIP
        cancel = self._cancel
        for item in items:
            if cancel.cancelled:
                return
            src, dst, _ = item
            if check and dst is not None and decide(src, dst) is skip:
                self.stats.add(skipped=1)
                self._emit(Outcome(Kind.SKIPPED, src.key, src.size))
            else:
                yield item

    # ---- listings -------------------------------------------------------------------------------
    def _listing(self, st: Storage, count: bool) -> Iterator[Entry]:
        kr, flt = self.opts.key_range, self.opts.filter
        for e in checked_order(ranged(st.list(start_after=kr.start_after()), kr), st.describe()):
            if st is self.dst:
                self.dst_listed = True
            if count:
                self.stats.add(found=1, found_bytes=e.size)
            if flt.active and not flt.admits(e.key):
                if count:
                    self.stats.add(excluded=1)
                continue
            yield e
        if st is self.dst:
            self.dst_listed = True  # an empty listing answers too

    def _not_a_file(self, src: Entry, child: str) -> None:
        """A source key a file-system destination cannot hold as a file (see `as_file_tree`)."""
        dst_key = src.key
        if not child:  # a directory marker: the directory is made by the files in it
            if src.size:
                log.warning("not copying the %d bytes of the directory marker %s: a file system keeps a "
                            "directory, not content, under that name", src.size, dst_key)
            self.stats.add(skipped=1)
            self._emit(Outcome(Kind.SKIPPED, src.key, src.size))
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
        self._emit(Outcome(Kind.FAILED, src.key, src.size, code=code, message=message))

    def _extra(self, d: Entry) -> None:
        self.stats.add(extra=1)
        self._emit(Outcome(Kind.EXTRA, d.key, d.size))

    def _clearing_the_way(self, pairs: Iterable[Pair], extras: Spool) -> Iterator[Item]:
        """The items of a merged listing (with --delete-dst onto a file system), deleting first
        the extras that would block a copy: a destination file that is a directory of a copied
        key, or the destination files under a copied file's name.

        Keys that may still turn out to be such a directory are kept on a stack until the merge
        has passed every key under them: a source file missing at the destination is handed out
        only then (after the extras under its name are gone), a destination extra spooled only
        then (unless it was deleted already). The stack holds only keys that are prefixes of the
        current one (`a`, `a.old`, `a.old/x`), so memory stays flat."""
        stack: list[_Pending] = []
        clear = self._deleter.clear

        def close(key: str | None) -> Iterator[Item]:
            # every key under stack[-1].key/ sorts in [key + "/", key + "0"): past it, none follows
            while stack and (key is None or key >= stack[-1].end):
                done = stack.pop()
                if done.item is not None:
                    yield done.item
                elif not done.cleared:
                    extras.add(done.key)

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
                        p.cleared = clear(p.key, key)
                    elif p.item is not None and s is None and not cleared:
                        # a destination file under p.key/, where the source now has a file p.key
                        cleared = clear(key, p.key)
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


@dataclass(slots=True)
class _Pending:
    """A key the merge may still find to be a directory on the other side (see
    `Planner._clearing_the_way`): a source file waiting to be handed out (`item`), or a destination
    extra waiting to be spooled (`cleared`: already deleted, or tried)."""

    key: str
    end: str  # key + "0": the first key after every key under key/
    item: Item | None = None
    cleared: bool = False
