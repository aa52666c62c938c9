"""Counters of one run. The same record feeds the progress bar, the final summary, `--json`,
job status and metrics."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

# How many failures are kept in memory for the summary; the rest are only counted (and logged).
MAX_FAILURES_KEPT = 1000


@dataclass(slots=True)
class Failure:
    key: str
    code: str
    message: str


@dataclass
class Stats:
    found: int = 0  # source entries listed (within the key range)
    found_bytes: int = 0
    excluded: int = 0  # dropped by --exclude/--include rules
    skipped: int = 0  # identical at the destination (sync), or not newer (--update)
    copied: int = 0
    copied_bytes: int = 0
    extra: int = 0  # at the destination only
    deleted: int = 0  # extras deleted (--delete-dst) plus sources deleted (--delete-src)
    would_delete: int = 0  # what a --dryrun would have deleted (it deletes nothing)
    failed: int = 0
    failed_bytes: int = 0
    not_tried: int = 0  # failed without a request, after a failure that every request would repeat
    bytes_moved: int = 0  # bytes through the pipe so far, including unfinished files (progress)
    listing_done: bool = False
    started: float = field(default_factory=time.monotonic)
    failures: list[Failure] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=64), repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def moved(self, n: int) -> None:
        # called for every chunk: kept lock-free (an int add under the GIL is atomic enough for a
        # progress figure; exact counters go through add())
        self.bytes_moved += n

    def fail(self, key: str, code: str, message: str, size: int = 0) -> None:
        with self._lock:
            self.failed += 1
            self.failed_bytes += size
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(Failure(key, code, message))

    def merge(self, delta: dict[str, int], failures: list[tuple[str, str, str]]) -> None:
        """Add another process's counters (see engine/fanout.py) and the failures it recorded."""
        self.add(**delta)
        with self._lock:
            room = MAX_FAILURES_KEPT - len(self.failures)
            self.failures.extend(Failure(*f) for f in failures[:max(room, 0)])

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def rates(self) -> tuple[float, float]:
        """(files/s, bytes/s) over the last few seconds, for live display."""
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, self.copied, self.bytes_moved))
            while len(self._samples) > 2 and now - self._samples[0][0] > 5:
                self._samples.popleft()
            t0, c0, b0 = self._samples[0]
        span = now - t0
        if span < 0.2:
            return self.copied / self.elapsed, self.bytes_moved / self.elapsed
        return (self.copied - c0) / span, (self.bytes_moved - b0) / span

    def summary(self) -> dict[str, int | float]:
        """The fields of the final summary and of `--json`."""
        return {
            "found": self.found,
            "excluded": self.excluded,
            "skipped": self.skipped,
            "copied": self.copied,
            "copied_bytes": self.copied_bytes,
            "extra": self.extra,
            "deleted": self.deleted,
            "would_delete": self.would_delete,
            "failed": self.failed,
            "not_tried": self.not_tried,
            "seconds": round(self.elapsed, 3),
        }
