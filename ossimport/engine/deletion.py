"""The deletion stage of a run: destination extras (--delete-dst), the extras that stand in the
way of a copy on a file system, and the temporary files of earlier interrupted runs.

Extras found by the merge are spooled to a temporary file (memory stays flat) and deleted only
after the copy phase, and only when nothing failed and the run was not stopped (as rclone does:
an incomplete listing must never turn into deletions). Every deletion first checks the run's
cancel token: a stopped run deletes nothing more.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from ossimport.engine.cancel import CancelToken
from ossimport.engine.options import RunOptions
from ossimport.engine.outcome import Kind, Listener, Outcome
from ossimport.engine.stats import Stats
from ossimport.errors import StorageError
from ossimport.storage.base import Storage

log = logging.getLogger("ossimport")


class Spool:
    """Keys written to a temporary file, read back once (the extras --delete-dst removes)."""

    def __init__(self) -> None:
        # closed in close()
        self._file: IO[str] = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
        self.count = 0

    def add(self, key: str) -> None:
        self._file.write(json.dumps(key) + "\n")
        self.count += 1

    def keys(self) -> Iterator[str]:
        self._file.seek(0)
        return (json.loads(line) for line in self._file)

    def close(self) -> None:
        self._file.close()


class Deleter:
    def __init__(self, src: Storage, dst: Storage, opts: RunOptions, stats: Stats, emit: Listener,
                 cancel: CancelToken) -> None:
        self.src, self.dst, self.opts, self.stats = src, dst, opts, stats
        self._emit = emit
        self._cancel = cancel

    def delete(self, st: Storage, key: str, kind: Kind, size: int = 0) -> None:
        """Delete `key` from `st` and count it; a dry run only counts it, as would_delete (the
        outcome is the same: front ends know a dry run and say "would delete")."""
        if self.opts.dryrun:
            self.stats.add(would_delete=1)
        else:
            st.delete(key)
            self.stats.add(deleted=1)
        self._emit(Outcome(kind, key, size))

    def clear(self, extra: str, blocked: str) -> bool:
        """Delete the destination extra `extra` now, before the copy of `blocked` it stands in the
        way of. Not while the source listing has left anything out (then it is not known that
        the source has no `extra`): the copy fails instead. True when it was deleted or tried."""
        if self.src.list_errors or self._cancel.cancelled:
            return False
        log.debug("deleting %s first: it is in the way of %s", extra, blocked)
        try:
            self.delete(self.dst, extra, Kind.DELETED)
        except StorageError as exc:
            self.stats.fail(extra, exc.code, f"delete failed: {exc}")
            self._emit(Outcome(Kind.FAILED, extra, code=exc.code,
                               message=f"delete failed (it is in the way of {blocked}): {exc}"))
            return True  # not again for the next key; the failure also cancels the other deletions
        return True

    def extras(self, spool: Spool, failed: bool) -> None:
        """Delete the spooled extras after the copy phase: only when nothing failed."""
        if not self.opts.delete_dst or not spool.count:
            return
        if failed or self._cancel.cancelled:
            log.error("not deleting %d extra destination files because there were errors", spool.count)
            return
        slots = threading.BoundedSemaphore(max(1, self.opts.threads) * 4)  # bounded, like the copy queue

        def delete(key: str) -> None:
            try:
                if self._cancel.cancelled:
                    return
                self.delete(self.dst, key, Kind.DELETED)
            except StorageError as exc:
                self.stats.fail(key, exc.code, f"delete failed: {exc}")
                self._emit(Outcome(Kind.FAILED, key, code=exc.code, message=f"delete failed: {exc}"))
            finally:
                slots.release()

        with ThreadPoolExecutor(max(1, self.opts.threads)) as pool:
            for key in spool.keys():
                if self._cancel.cancelled:
                    break
                slots.acquire()
                pool.submit(delete, key)

    def old_temps(self) -> None:
        """Remove the temporary files of earlier interrupted runs that the destination listing
        met (ours by name, and older than this run: a concurrent run's are left alone). Not in
        a dry run or an audit, and not once stopped."""
        found = self.dst.old_temps
        if not found or self.opts.dryrun or self.opts.verify_only or self._cancel.cancelled:
            return
        removed = 0
        for key in found:
            try:
                self.dst.delete(key)
                removed += 1
            except StorageError as exc:
                log.warning("could not remove the temporary file %s of an interrupted run: %s", key, exc)
        log.info("removed %d temporary files that interrupted runs left at the destination", removed)
