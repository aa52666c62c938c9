"""Checksums of a file written in ranges, computed while the ranges still arrive.

A parallel ranged download writes ranges at their offsets in any order, so its bytes never pass
as one stream to hash. Reading the whole file back after the last range is a second pass that
nothing overlaps. `HashBehind` instead follows the written bytes in file order: whenever the
bytes from the point hashed so far on have been written, one of the writing threads reads them
back from the file being written (`Writer.read_at`, the page cache for a local file) and hashes
them, so what is hashed is what is on disk, and once the last range is in only its own tail is
left. Extra memory: one read of at most 1 MiB.

It is for writers that read back cheaply (`Writer.reads_back`). It gives up (`digests()` is None,
and the caller reads the file back after all) where reading back failed and where a range is
written again after part of it was hashed (a retried range may bring other bytes than the try
that was hashed).
"""

from __future__ import annotations

import logging
import threading

from ossimport.engine.stream import Hasher
from ossimport.storage.base import Writer

log = logging.getLogger("ossimport")

MiB = 1024 * 1024


class HashBehind:
    def __init__(self, writer: Writer, size: int, names: set[str]) -> None:
        self._writer, self._size = writer, size
        self._hasher = Hasher(names)
        self._lock = threading.Lock()
        self._at = 0  # bytes hashed
        self._claimed = 0  # bytes hashed or being hashed by the thread whose turn it is
        self._spans: dict[int, int] = {}  # start -> end: written past _claimed, not hashed yet
        self._busy = False  # a thread is hashing
        self._lost = False

    def restart(self, start: int, end: int) -> None:
        """[start, end) is about to be written (again): what an earlier try wrote there is void."""
        with self._lock:
            if self._claimed > start:
                self._lost = True
            for s in [s for s in self._spans if start <= s < end]:
                del self._spans[s]

    def written(self, start: int, end: int) -> None:
        """[start, end) is written. The calling thread hashes whatever this makes contiguous,
        unless another one is at it (it picks this span up before it stops)."""
        with self._lock:
            if self._lost:
                return
            self._spans[start] = end
            if self._busy:
                return
            self._busy = True
        try:
            while (span := self._claim()) is not None:
                self._hash(*span)
                with self._lock:
                    self._at = span[1]
        except Exception as exc:  # read back after commit instead, which reports a lasting fault
            log.debug("hashing the written ranges in order stopped: %s", exc)
            with self._lock:
                self._lost, self._busy = True, False

    def _claim(self) -> tuple[int, int] | None:
        """The next contiguous written span past what is hashed; None (turn given up) if none."""
        with self._lock:
            end = self._at
            while not self._lost and end in self._spans:
                end = self._spans.pop(end)
            if end == self._at or self._lost:
                self._busy = False
                return None
            self._claimed = end
            return self._at, end

    def _hash(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            data = self._writer.read_at(pos, min(MiB, end - pos))
            if not data:
                raise OSError(f"no bytes read back at {pos}")
            self._hasher.update(data)
            pos += len(data)

    def digests(self) -> dict[str, str] | None:
        """Checksums of the whole file, once every range is written and hashed; else None."""
        with self._lock:
            if self._lost or self._busy or self._at != self._size:
                return None
        return self._hasher.digests()
