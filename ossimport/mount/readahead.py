"""Reads of one open object: ranged GETs, with read-ahead only while the reader is sequential.

A file no larger than the first window is read whole by its first read, in one GET. For larger
ones, a reader that starts at 0 or continues where its last read ended is sequential: the next
`window` bytes are fetched ahead in blocks by a shared thread pool (several ranges in flight per
file), and the window doubles each time the reader has used half of what was fetched, from
`first_window` (1 MiB) up to `max_window`. A read anywhere else is random: it costs exactly one
ranged GET of the bytes asked for, fetches nothing ahead and resets the window.

Every fetched-ahead byte is charged to one `MemoryBudget` shared by all open files. Windows grow
only to a fair share of it (budget / 2 / files being read sequentially), so many large files read
at once (data loader workers over tar shards) all keep streaming; when it is spent anyway, a
file reads on without read-ahead (one GET per read) until blocks are used and released.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ossimport.errors import SourceChanged
from ossimport.retry import with_retries
from ossimport.storage.base import Storage

log = logging.getLogger("ossimport")

MiB = 1024 * 1024


class MemoryBudget:
    """Bytes of read-ahead all open files may hold at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.streams = 0  # files being read sequentially now: they share the budget
        self._lock = threading.Lock()

    def joined(self, delta: int) -> None:
        with self._lock:
            self.streams += delta

    def fair_window(self, first: int, largest: int) -> int:
        """The widest window one stream may grow to: a fair share of the budget (a stream holds up
        to about twice its window: what is fetched ahead plus what is still being read)."""
        return max(first, min(largest, self.limit // (2 * max(1, self.streams))))

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


@dataclass(slots=True)
class _Block:
    start: int
    end: int
    future: Future[bytes]


def fetch(storage: Storage, key: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `key`, exactly, retried like any copy."""

    def once() -> bytes:
        with storage.open(key, start, end) as f:
            data = f.read(end - start + 1)
        if len(data) != end - start:
            raise SourceChanged(f"{key!r}: asked for {end - start} bytes at {start}, got {len(data)} "
                                "(the object changed since it was opened?)")
        return data

    return with_retries(once, what=f"{key} at {start}")


class Reader:
    """The read side of one open file handle. Thread-safe: libfuse may run two reads of one handle
    at once (kernel read-ahead), and they may arrive slightly out of order."""

    def __init__(self, storage: Storage, key: str, size: int, pool: ThreadPoolExecutor,
                 budget: MemoryBudget, first_window: int = MiB, max_window: int = 64 * MiB,
                 max_block: int = 8 * MiB) -> None:
        self.storage = storage
        self.key = key
        self.size = size
        self._pool = pool
        self._budget = budget
        self._first = first_window
        self._max_window = max(max_window, first_window)
        self._max_block = max_block
        self._lock = threading.Lock()
        self._blocks: list[_Block] = []  # contiguous, ascending, ending at `_frontier`
        self._frontier = 0
        self._window = first_window
        self._streaming = False
        self._trigger = 0  # a sequential read reaching this offset fetches the next window
        self._grown = False  # the first window is not doubled
        self._last_end = 0  # where the previous read ended: a read starting here is sequential
        self._whole: bytes | None = None  # all of a small file, once read
        self.gets = 0  # ranged GETs made (read-ahead blocks and direct reads): for tests and stats

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if self.size <= self._first:
            return self._small(offset, end)
        with self._lock:
            blocks = self._plan(offset, end)
            self._last_end = end
        if blocks is None:
            self.gets += 1
            return fetch(self.storage, self.key, offset, end)
        parts = []
        for b in blocks:
            try:
                data = b.future.result()
            except BaseException:
                with self._lock:
                    self._drop_from(b)  # fetched again by the next read, not failed forever
                raise
            parts.append(data[max(offset, b.start) - b.start: min(end, b.end) - b.start])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _small(self, offset: int, end: int) -> bytes:
        """A file no larger than the first window: one GET of all of it, in the calling thread
        (no hand-off to the pool: per-file latency is what bounds many small files)."""
        data = self._whole
        if data is None:
            self.gets += 1
            data = fetch(self.storage, self.key, 0, self.size)
            with self._lock:
                if self._whole is None and self._budget.take(self.size):
                    self._whole = data  # later reads of it (a reader asking 4 KiB at a time) are free
        return data[offset:end]

    def close(self) -> None:
        with self._lock:
            self._drop(len(self._blocks))
            self._set_streaming(False)
            if self._whole is not None:
                self._budget.give(self.size)
                self._whole = None

    # ---- planning (under the lock) ----------------------------------------------------------------
    def _plan(self, offset: int, end: int) -> list[_Block] | None:
        """The blocks that will hold [offset, end), scheduling read-ahead; None: read it directly."""
        first = self._blocks[0].start if self._blocks else self._frontier
        if self._streaming and first <= offset < self._frontier + self._window:
            pass  # inside what is fetched, or just ahead of it (reads may overtake each other)
        elif offset == 0 or offset == self._last_end:
            self._restart(offset)
        elif self._streaming and first - self._window <= offset < first:
            return None  # a late read just behind the stream: leave the stream alone
        else:
            self._drop(len(self._blocks))  # random access: no read-ahead
            self._set_streaming(False)
            return None
        while self._blocks and self._blocks[0].end + self._first <= offset:
            self._drop(1)  # well behind the reader: used
        if offset >= self._trigger or end > self._frontier:
            if self._grown:
                self._window = min(self._window * 2, self._budget.fair_window(self._first, self._max_window))
            start = self._frontier
            self._schedule(max(end, start + self._window))
            self._grown = True
            # the next window is fetched when the reader is half way through this one
            self._trigger = start + max(1, (self._frontier - start) // 2)
        covering = [b for b in self._blocks if b.start < end and b.end > offset]
        if not covering or covering[0].start > offset or covering[-1].end < end:
            return None  # the budget is spent: this read goes directly
        return covering

    def _set_streaming(self, on: bool) -> None:
        if on != self._streaming:
            self._budget.joined(1 if on else -1)
            self._streaming = on

    def _restart(self, offset: int) -> None:
        self._drop(len(self._blocks))
        self._set_streaming(True)
        self._frontier = self._trigger = offset
        self._window = self._first
        self._grown = False

    def _schedule(self, target: int) -> None:
        target = min(target, self.size)
        block = min(max(self._window // 4, self._first), self._max_block)
        while self._frontier < target:
            start = self._frontier
            stop = min(start + block, self.size)
            if not self._budget.take(stop - start):
                return
            self.gets += 1
            fut = self._pool.submit(fetch, self.storage, self.key, start, stop)
            self._blocks.append(_Block(start, stop, fut))
            self._frontier = stop

    def _drop(self, n: int) -> None:
        for b in self._blocks[:n]:
            b.future.cancel()
            self._budget.give(b.end - b.start)
        del self._blocks[:n]

    def _drop_from(self, block: _Block) -> None:
        """A block failed: forget it and everything after it; the next read fetches again."""
        for i, b in enumerate(self._blocks):
            if b is block:
                for later in self._blocks[i:]:
                    later.future.cancel()
                    self._budget.give(later.end - later.start)
                del self._blocks[i:]
                self._frontier = self._trigger = block.start
                return
