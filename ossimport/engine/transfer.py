"""One copy, verified: the only code path that moves bytes, for every front end.

Paths, chosen by the abilities both ends declare:
  server-side copy     both ends on one server (copy())
  multipart upload     large objects to a store with multipart: parts read by range and sent in
                       parallel; the composite ETag is checked against the parts' MD5s
  ranged download      large objects to a file system with random writes: parallel ranged reads
                       written at their offsets, published by one rename
  single stream        everything else; local to local uses the kernel's copy_file_range
Checksums are computed while the bytes stream (never a second read of the source). After
writing, the size and every checksum both ends can tell are compared; a mutable source (file
system) is re-checked so that a file changed during its copy fails as SIZE_NOT_MATCH /
SOURCE_CHANGED and is never recorded as copied.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ossimport.engine.cancel import CancelToken
from ossimport.engine.stats import Stats
from ossimport.engine.stream import Hasher, MeteredReader, multipart_etag
from ossimport.engine.throttle import TokenBucket
from ossimport.errors import NotFound, SourceChanged, StorageError, VerifyFailed
from ossimport.retry import with_retries
from ossimport.storage.base import CRC64, MD5, Entry, Part, Storage

log = logging.getLogger("ossimport")

MiB = 1024 * 1024


@dataclass
class TransferOptions:
    multipart_threshold: int = 64 * MiB  # ossimport: multipartUploadThreshold
    part_size: int = 16 * MiB  # ossimport: multipartUploadPartSize (raised to fit max_parts)
    part_threads: int = 8  # parallel parts across all large files of a process
    attempts: int = 4  # tries per file and per part
    checksum: bool = False  # verify content by checksum, reading the destination back if needed
    keep_perms: bool = True
    server_side_copy: bool = True
    bucket: TokenBucket | None = None


def _plain_etag(etag: str | None) -> str | None:
    """An ETag that is an MD5 of the content (not multipart, not empty)."""
    if etag and "-" not in etag and len(etag) == 32:
        return etag.lower()
    return None


class Transfer:
    """Copies entries from `src` to `dst`. Thread-safe: one instance serves all worker threads."""

    def __init__(self, src: Storage, dst: Storage, opts: TransferOptions, stats: Stats,
                 cancel: CancelToken | None = None) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.stats = stats
        self.cancel = cancel or CancelToken()  # a stopped run abandons its copies mid-stream
        self._parts: ThreadPoolExecutor | None = None
        self._parts_lock = threading.Lock()
        self._server_side = (
            opts.server_side_copy
            and type(src) is type(dst)
            and dst.abilities.server_side_copy
            and dst.same_server(src)
        )
        # the kernel copies local to local when nothing needs to see the bytes on the way
        self._kernel_copy = src.scheme == dst.scheme == "local" and opts.bucket is None

    # ---- public -------------------------------------------------------------------------------
    def copy(self, entry: Entry, dst_key: str) -> Entry:
        """Copy `entry` to `dst_key` with retries; returns the destination entry. Raises
        StorageError with a code users know (SIZE_NOT_MATCH, SOURCE_DELETED, ...)."""
        return with_retries(lambda: self._copy_once(entry, dst_key), attempts=self.opts.attempts,
                            what=entry.key, sleep=self.cancel.sleep)

    def same_content(self, s: Entry, d: Entry) -> bool:
        """Content equality for --checksum, from reported checksums where both sides have a
        comparable one, else by reading and hashing the side (or sides) that report no MD5."""
        for name in (CRC64, MD5):
            a, b = self._reported(self.src, s, name), self._reported(self.dst, d, name)
            if a and b:
                return a == b
        # an MD5 one side reports (an object store's ETag) spares reading that side
        a, b = self._reported(self.src, s, MD5), self._reported(self.dst, d, MD5)
        return (a or self._read_md5(self.src, s.key)) == (b or self._read_md5(self.dst, d.key))

    def close(self) -> None:
        if self._parts is not None:
            self._parts.shutdown(wait=True, cancel_futures=True)

    # ---- one attempt ----------------------------------------------------------------------------
    def _copy_once(self, entry: Entry, dst_key: str) -> Entry:
        try:
            if self.src.abilities.mutable_files:
                # a file may have changed since it was listed (or since a task was cut): copy what
                # it is now, and re-check against that after the copy
                entry = self.src.head(entry.key)
            if self._server_side:
                result = self.dst.copy(entry.key, dst_key, src_root=self.src, size=entry.size)
                self.stats.moved(entry.size)
                self._check_size(entry, result, dst_key)
                return result
            large = entry.size >= self.opts.multipart_threshold and self.src.abilities.ranged_read
            if large and self.dst.abilities.multipart:
                result = self._multipart(entry, dst_key)
            elif large and self.dst.abilities.random_write and not self._kernel_copy:
                result = self._ranged_download(entry, dst_key)
            else:
                result = self._stream(entry, dst_key)
        except NotFound as exc:
            if exc.code == "NoSuchBucket" or self._source_exists(entry.key):
                raise  # the 404 came from the destination (or a bucket): report it as it is
            raise StorageError(f"source {entry.key!r} was deleted after listing", code="SOURCE_DELETED") from exc
        self._recheck_source(entry, dst_key)
        return result

    def _stream(self, entry: Entry, dst_key: str) -> Entry:
        names = self._stream_hashes(entry)
        raw = self.src.open(entry.key)
        reader: Any = raw
        hasher = None
        if names or not self._kernel_copy:
            hasher = Hasher(names) if names else None
            reader = MeteredReader(raw, hasher=hasher, bucket=self.opts.bucket, cancel=self.cancel,
                                   on_bytes=self.stats.moved)
        try:
            result = self.dst.put(dst_key, reader, entry.size, mtime=entry.mtime, mode=self._mode(entry))
        finally:
            reader.close()
        if reader is raw:
            self.stats.moved(entry.size)
        self._verify(entry, dst_key, result, hasher.digests() if hasher else {})
        return result

    def _multipart(self, entry: Entry, dst_key: str) -> Entry:
        psize = self._part_size(entry.size)
        upload_id = self.dst.create_multipart(dst_key, mtime=entry.mtime, mode=self._mode(entry))
        futures: list[Future[tuple[Part, bytes]]] = []
        try:
            for number, offset in enumerate(range(0, entry.size, psize), start=1):
                length = min(psize, entry.size - offset)
                futures.append(self._pool().submit(self._send_part, entry, dst_key, upload_id, number, offset, length))
            done = [f.result() for f in futures]
            result = with_retries(
                lambda: self.dst.complete_multipart(dst_key, upload_id, [p for p, _ in done]),
                attempts=self.opts.attempts, what=f"complete {dst_key}",
            )
        except BaseException:
            for f in futures:
                f.cancel()
            self._abort(dst_key, upload_id)
            raise
        # abort every other unfinished upload of this key: parts of an earlier run killed mid-upload,
        # and a create whose answer was lost and retried by the client (one LIST per large file)
        self.dst.remove_stale_temps([dst_key])
        expected = multipart_etag([digest for _, digest in done])
        if not result.etag:  # some servers (Ceph) answer CompleteMultipartUpload without an ETag
            result = self.dst.head(dst_key)
        self._check_size(entry, result, dst_key)
        if self.dst.abilities.etag_is_md5 and result.etag and result.etag.lower() != expected:
            self._discard(dst_key)
            raise VerifyFailed(f"{dst_key!r}: multipart ETag {result.etag} differs from the parts sent ({expected})")
        if self.opts.checksum:
            self._verify_by_reading(entry, dst_key, None)
        return result

    def _send_part(self, entry: Entry, dst_key: str, upload_id: str, number: int, offset: int,
                   length: int) -> tuple[Part, bytes]:
        def once() -> tuple[Part, bytes]:
            with self.src.open(entry.key, offset, offset + length) as raw:
                reader = MeteredReader(raw, bucket=self.opts.bucket, cancel=self.cancel,
                                       on_bytes=self.stats.moved)
                data = reader.read(length + 1)
            if len(data) != length:
                raise SourceChanged(f"{entry.key!r}: part {number} read {len(data)} bytes, expected {length}")
            digest = hashlib.md5(data).digest()
            part = self.dst.upload_part(dst_key, upload_id, number, data)
            # each part is checked as it lands (a store may take parts without Content-MD5, as S3's
            # lean path does to spare a second MD5 pass over every part): a damaged part is sent
            # again at once instead of failing the whole object at the end
            if self.dst.abilities.etag_is_md5 and _plain_etag(part.etag) not in (None, digest.hex()):
                raise VerifyFailed(f"{entry.key!r}: part {number} arrived with ETag {part.etag}, "
                                   f"the bytes sent have MD5 {digest.hex()}")
            return part, digest

        return with_retries(once, attempts=self.opts.attempts, what=f"{entry.key} part {number}")

    def _ranged_download(self, entry: Entry, dst_key: str) -> Entry:
        psize = self._part_size(entry.size)
        writer = self.dst.open_writer(dst_key, entry.size)
        futures: list[Future[None]] = []

        def fetch(offset: int, length: int) -> None:
            def once() -> None:
                pos = offset
                with self.src.open(entry.key, offset, offset + length) as raw:
                    reader = MeteredReader(raw, bucket=self.opts.bucket, cancel=self.cancel,
                                           on_bytes=self.stats.moved)
                    while pos < offset + length and (chunk := reader.read(min(MiB, offset + length - pos))):
                        writer.write_at(pos, chunk)
                        pos += len(chunk)
                if pos != offset + length:
                    raise SourceChanged(f"{entry.key!r}: range at {offset} ended {offset + length - pos} bytes short")

            with_retries(once, attempts=self.opts.attempts, what=f"{entry.key} range {offset}")

        try:
            for offset in range(0, entry.size, psize):
                futures.append(self._pool().submit(fetch, offset, min(psize, entry.size - offset)))
            for f in futures:
                f.result()
            writer.commit(mtime=entry.mtime, mode=self._mode(entry))
        except BaseException:
            for f in futures:
                f.cancel()
            writer.abort()
            raise
        result = self.dst.head(dst_key)
        self._check_size(entry, result, dst_key)
        if self.opts.checksum:
            self._verify_by_reading(entry, dst_key, None)
        return result

    # ---- verification -----------------------------------------------------------------------------
    def _stream_hashes(self, entry: Entry) -> set[str]:
        names: set[str] = set()
        if self.opts.checksum or self.dst.abilities.etag_is_md5 or (
            self.src.abilities.etag_is_md5 and _plain_etag(entry.etag)
        ):
            names.add(MD5)
        if CRC64 in self.dst.abilities.hashes or CRC64 in entry.checksums:
            names.add(CRC64)
        return names

    def _verify(self, entry: Entry, dst_key: str, result: Entry, digests: dict[str, str]) -> None:
        self._check_size(entry, result, dst_key)
        compared = False
        sent_md5 = digests.get(MD5)
        for name, side, reported in (
            (MD5, "source", _plain_etag(entry.etag) if self.src.abilities.etag_is_md5 else None),
            (MD5, "destination", _plain_etag(result.etag) if self.dst.abilities.etag_is_md5 else None),
            (CRC64, "source", entry.checksums.get(CRC64)),
            (CRC64, "destination", result.checksums.get(CRC64)),
        ):
            ours = digests.get(name)
            if ours and reported:
                compared = compared or side == "destination"
                if ours != reported:
                    if side == "destination":
                        self._discard(dst_key)
                    raise VerifyFailed(f"{entry.key!r}: {name} of the bytes sent ({ours}) differs from the "
                                       f"{side}'s ({reported})")
        if self.opts.checksum and not compared:
            self._verify_by_reading(entry, dst_key, sent_md5)

    def _verify_by_reading(self, entry: Entry, dst_key: str, sent_md5: str | None) -> None:
        """--checksum where the destination reports nothing comparable: read it back and hash."""
        got = self._read_md5(self.dst, dst_key)
        want = sent_md5
        if want is None and self.src.abilities.etag_is_md5:
            want = _plain_etag(entry.etag)
        if want is None:
            want = self._read_md5(self.src, entry.key)
        if got != want:
            self._discard(dst_key)
            raise VerifyFailed(f"{entry.key!r}: content at the destination differs from the source (md5)")

    def _check_size(self, entry: Entry, result: Entry, dst_key: str) -> None:
        if result.size != entry.size:
            self._discard(dst_key)
            raise SourceChanged(f"{entry.key!r}: destination has {result.size} bytes, source listed {entry.size}")

    def _recheck_source(self, entry: Entry, dst_key: str) -> None:
        """A file system source can change while we read it; an object cannot."""
        if not self.src.abilities.mutable_files:
            return
        try:
            now = self.src.head(entry.key)
        except NotFound:
            return  # deleted after a complete, verified read: what we copied was whole
        if now.size != entry.size:
            self._discard(dst_key)
            raise SourceChanged(f"{entry.key!r} changed size during the copy ({entry.size} -> {now.size})")
        if now.mtime != entry.mtime:
            self._discard(dst_key)
            raise SourceChanged(f"{entry.key!r} was modified during the copy", code="SOURCE_CHANGED")

    # ---- helpers --------------------------------------------------------------------------------------
    def _source_exists(self, key: str) -> bool:
        try:
            self.src.head(key)
        except NotFound:
            return False
        return True

    def _reported(self, st: Storage, e: Entry, name: str) -> str | None:
        if name in e.checksums:
            return e.checksums[name]
        if name == MD5 and st.abilities.etag_is_md5:
            return _plain_etag(e.etag)
        return None

    def _read_md5(self, st: Storage, key: str) -> str:
        h = hashlib.md5()
        with st.open(key) as f:
            reader = MeteredReader(f, bucket=self.opts.bucket, cancel=self.cancel)
            while chunk := reader.read(MiB):
                h.update(chunk)
        return h.hexdigest()

    def _mode(self, entry: Entry) -> int | None:
        return entry.mode if self.opts.keep_perms and self.dst.abilities.posix_mode else None

    def _part_size(self, size: int) -> int:
        ab = self.dst.abilities
        need = -(-size // ab.max_parts)  # ceil: never more parts than the store allows
        return min(max(self.opts.part_size, ab.min_part_size, need), ab.max_part_size)

    def _pool(self) -> ThreadPoolExecutor:
        with self._parts_lock:
            if self._parts is None:
                self._parts = ThreadPoolExecutor(max(1, self.opts.part_threads), thread_name_prefix="part")
            return self._parts

    def _abort(self, dst_key: str, upload_id: str) -> None:
        try:
            self.dst.abort_multipart(dst_key, upload_id)
        except StorageError as exc:  # an orphan upload is reported, not hidden
            log.warning("could not abort the multipart upload of %s: %s", dst_key, exc)

    def _discard(self, dst_key: str) -> None:
        """Remove what we just wrote when it cannot be trusted, so no later sync skips it."""
        try:
            self.dst.delete(dst_key)
        except StorageError as exc:
            log.warning("could not remove the unverified copy %s: %s", dst_key, exc)
