"""What arrives at a subtask's destination, seen as it streams: bytes so far (Progress) and the
CRC-64 of exactly those bytes (FileDetail.Checksum), with no second read; and the cancel switch.

`Arriving` wraps the destination Storage handed to the engine, so the engine's one copy path
(single stream, multipart upload, ranged download) runs unchanged. Each path hands the
destination its bytes differently — a reader, numbered parts, chunks at offsets — so every piece
gets its own CRC and length, and the whole file's CRC is the pieces combined in file order
(CRC-64 combination, as OSS SDKs do for multipart objects). A retried piece replaces the earlier
try; a retried whole copy starts the record again.
"""

from __future__ import annotations

import threading
from typing import Any, BinaryIO

from oss2.utils import Crc64

from ossimport.engine.stream import crc64
from ossimport.errors import StorageError
from ossimport.storage.base import Entry, Part, Storage, Writer

_combiner: list[Any] = []


def _combine() -> Any:
    """CRC-64 combination (built once: making it costs ~0.2 ms, a tenth of a small subtask)."""
    if not _combiner:
        _combiner.append(Crc64().combine)
    return _combiner[0]


class Canceled(StorageError):
    def __init__(self) -> None:
        super().__init__("the subtask was canceled", code="Canceled", retryable=False)


class Arrival:
    """Pieces of one file that reached the destination: position -> (crc64, length)."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self._pieces: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._pieces = {}

    def check(self) -> None:
        if self.cancel.is_set():
            raise Canceled()

    def add(self, position: int, data: bytes, *, extend: bool = False) -> None:
        """Record `data` at `position` (a new piece, or, with `extend`, more of a streamed one)."""
        self.check()
        with self._lock:
            piece = self._pieces.get(position) if extend else None
            if piece is None:
                self._pieces[position] = [crc64(data), len(data)]
            else:
                piece[0] = crc64(data, piece[0])
                piece[1] += len(data)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._pieces.values())

    def checksum(self) -> tuple[int, int]:
        """(crc64, length) of the pieces in file order."""
        crc = total = 0
        with self._lock:
            for _, (piece_crc, length) in sorted(self._pieces.items()):
                crc = _combine()(crc, piece_crc, length) if total else piece_crc
                total += length
        return crc, total


class _Reader:
    def __init__(self, raw: BinaryIO, arrival: Arrival) -> None:
        self.raw = raw
        self.arrival = arrival

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.arrival.add(0, data, extend=True)
        else:
            self.arrival.check()
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()


class _Writer(Writer):
    def __init__(self, inner: Writer, arrival: Arrival) -> None:
        self.inner = inner
        self.arrival = arrival

    def write_at(self, offset: int, data: bytes) -> None:
        self.arrival.check()
        self.inner.write_at(offset, data)
        self.arrival.add(offset, data)  # counted once written

    @property
    def reads_back(self) -> bool:  # type: ignore[override]
        return self.inner.reads_back

    def read_at(self, offset: int, n: int) -> bytes:
        return self.inner.read_at(offset, n)

    def commit(self, mtime: float | None = None, mode: int | None = None) -> None:
        self.arrival.check()
        self.inner.commit(mtime=mtime, mode=mode)

    def abort(self) -> None:
        self.inner.abort()


class Arriving:
    """A destination Storage that records what arrives in `arrival` (everything else delegated)."""

    def __init__(self, inner: Storage, arrival: Arrival) -> None:
        self._inner = inner
        self.arrival = arrival

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put(self, key: str, data: Any, size: int, **kw: Any) -> Entry:
        self.arrival.reset()
        return self._inner.put(key, _Reader(data, self.arrival), size, **kw)

    def create_multipart(self, key: str, **kw: Any) -> str:
        self.arrival.reset()
        return self._inner.create_multipart(key, **kw)

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        self.arrival.check()
        part = self._inner.upload_part(key, upload_id, number, data)
        self.arrival.add(number, data)  # counted once the store took the part
        return part

    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        self.arrival.check()
        return self._inner.complete_multipart(key, upload_id, parts)

    def open_writer(self, key: str, size: int) -> Writer:
        self.arrival.reset()
        return _Writer(self._inner.open_writer(key, size), self.arrival)
