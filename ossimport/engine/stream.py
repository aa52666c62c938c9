"""Bytes on their way: checksums computed while they stream, the bandwidth limit, progress.

A `MeteredReader` wraps the source reader handed to `Storage.put`, so the content is hashed by
the same read that sends it (never a second read) and every chunk passes the token bucket."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

from ossimport.engine.cancel import CancelToken
from ossimport.engine.throttle import TokenBucket
from ossimport.storage.base import CRC64, MD5

_crc64_fun: Callable[..., int] | None = None


def crc64(data: bytes, crc: int = 0) -> int:
    """CRC-64/ECMA-182 as Alibaba OSS reports it (x-oss-hash-crc64ecma), continued from `crc`."""
    global _crc64_fun
    if _crc64_fun is None:
        import crcmod  # a C extension shipped with oss2's dependencies

        _crc64_fun = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)
    return _crc64_fun(data, crc)


class Hasher:
    """Several checksums over one stream of bytes."""

    def __init__(self, names: frozenset[str] | set[str]) -> None:
        self._md5 = hashlib.md5() if MD5 in names else None
        self._crc: int | None = 0 if CRC64 in names else None

    def update(self, data: bytes | memoryview) -> None:
        if self._md5 is not None:
            self._md5.update(data)
        if self._crc is not None:
            self._crc = crc64(bytes(data), self._crc)

    def digests(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self._md5 is not None:
            out[MD5] = self._md5.hexdigest()
        if self._crc is not None:
            out[CRC64] = str(self._crc)
        return out


class MeteredReader:
    """A read-only file object over `raw` that hashes, throttles and counts what passes, and
    raises Cancelled once `cancel` is set."""

    def __init__(
        self,
        raw: BinaryIO,
        *,
        hasher: Hasher | None = None,
        bucket: TokenBucket | None = None,
        on_bytes: Callable[[int], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        self.raw = raw
        self.cancel = cancel
        self.hasher = hasher
        self.bucket = bucket
        self.on_bytes = on_bytes
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(1024 * 1024):
                chunks.append(chunk)
            return b"".join(chunks)
        if self.cancel is not None:
            self.cancel.check()  # a stopped run abandons a copy between two chunks
        if self.bucket is not None:
            # ask for the tokens before reading so the limit holds for the bytes we pass on
            self.bucket.consume(n, self.cancel)
        data = self.raw.read(n)
        if data:
            self.count += len(data)
            if self.hasher is not None:
                self.hasher.update(data)
            if self.on_bytes is not None:
                self.on_bytes(len(data))
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> MeteredReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

