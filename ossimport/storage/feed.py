"""A put body that proves itself: exactly `size` bytes of a source, hashed as they pass, for the
object-store backends whose single PUT streams (s3.py, azure.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import BinaryIO

from ossimport.errors import SourceChanged

CHUNK = 1024 * 1024  # what chunks() hands on at a time


class Feed:
    """What put() sends: exactly `size` bytes of `data`, hashed as they pass. Before the last
    byte is handed on, a source longer or shorter than `size` (SIZE_NOT_MATCH) or whose MD5 is
    not the `content_md5` announced (SOURCE_CHANGED) raises, so the store never sees a complete
    body and keeps nothing."""

    def __init__(self, data: BinaryIO, size: int, content_md5: str | None, what: str) -> None:
        self._data, self.len, self._left, self.content_md5, self._what = data, size, size, content_md5, what
        self._md5 = hashlib.md5()
        if size == 0:
            self._check_end()

    def read(self, amt: int | None = -1) -> bytes:
        if self._left == 0:
            return b""
        want = self._left if amt is None or amt < 0 else min(amt, self._left)
        chunk = read_at_most(self._data, want)  # raw streams and sockets return short reads
        self._md5.update(chunk)
        self._left -= len(chunk)
        if len(chunk) < want:
            raise SourceChanged(f"{self._what}: expected {self.len} bytes, the source gave {self.len - self._left}")
        if self._left == 0:
            self._check_end()
        return chunk

    def _check_end(self) -> None:
        if self._data.read(1):
            raise SourceChanged(f"{self._what}: expected {self.len} bytes, the source gave more")
        if self.content_md5 and self.md5() != self.content_md5:
            raise SourceChanged(f"{self._what}: the source changed after it was hashed", code="SOURCE_CHANGED")

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def md5(self) -> str:
        return self._md5.hexdigest()


def read_at_most(stream: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes, looping because raw streams and sockets return short reads."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
