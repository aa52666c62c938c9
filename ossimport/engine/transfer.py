"""One copy, verified: the only code path that moves bytes, for every front end.

Paths, chosen by the abilities both ends declare:
  server-side copy     both ends on one server (copy())
  multipart upload     large objects to a store with multipart: parts read by range and sent in
                       parallel, each checked by the store on arrival
  ranged download      large objects to a file system with random writes: parallel ranged reads
                       written at their offsets, published by one rename
  single stream        everything else; local to local uses the kernel's copy_file_range
Checksums are computed while the bytes stream. Which checksum a value is, is the backends'
business (`Entry.checksums`, a reader's `checksums`): the engine compares only values of the same
kind and never reads meaning into an ETag. After writing, the size and every checksum both sides
can tell are compared; a mutable source (file system) is re-checked so that a file changed during
its copy fails as SIZE_NOT_MATCH / SOURCE_CHANGED and is never recorded as copied.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from ossimport.engine.behind import HashBehind
from ossimport.engine.cancel import CancelToken
from ossimport.engine.stats import Stats
from ossimport.engine.stream import Hasher, MeteredReader
from ossimport.engine.throttle import TokenBucket
from ossimport.errors import NotFound, SourceChanged, StorageError, VerifyFailed
from ossimport.retry import with_retries
from ossimport.storage.base import CRC64, MD5, Entry, Part, Storage, reader_checksums

log = logging.getLogger("ossimport")

MiB = 1024 * 1024
KINDS = (MD5, CRC64)  # the checksum kinds the engine can compute, in order of preference


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
    # keep every file's MD5 with the object (jobs: workerRecordMd5) on a store that keeps one
    # (Abilities.md5_up_front_from; S3: rclone's md5chksum metadata), hashing a source that does
    # not report its MD5 before sending it (a second read); otherwise only large files get one
    record_md5: bool = False


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
        """Whether two entries of the same size hold the same bytes (--checksum, and the proof a
        move needs before it deletes a source): by checksums of one kind both sides report (a
        HEAD where the listing had none), else by hashing what a side cannot report."""
        if s.size != d.size:
            return False
        s_sums, d_sums = self._reported(self.src, s), self._reported(self.dst, d)
        found = _common(s_sums, d_sums)
        if found is not None:
            return found
        for name in KINDS:  # one side reports a kind: compute it for the other side only
            if name in s_sums:
                return self._read_digests(self.dst, d.key, {name})[name] == s_sums[name]
            if name in d_sums:
                return self._read_digests(self.src, s.key, {name})[name] == d_sums[name]
        return self._read_digests(self.src, s.key, {MD5}) == self._read_digests(self.dst, d.key, {MD5})

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
        wants = self.dst.abilities.md5_up_front_from
        known = self._md5_up_front(entry) if wants and (entry.size >= wants or self.opts.record_md5) else None
        raw = self.src.open(entry.key)
        source_says = {**entry.checksums, **reader_checksums(raw)}
        names = self._stream_hashes(source_says, known)
        reader: Any = raw
        hasher = None
        if names or not self._kernel_copy:
            hasher = Hasher(names) if names else None
            reader = MeteredReader(raw, hasher=hasher, bucket=self.opts.bucket, cancel=self.cancel,
                                   on_bytes=self.stats.moved)
        try:
            result = self.dst.put(dst_key, reader, entry.size, mtime=entry.mtime, mode=self._mode(entry),
                                  content_md5=known)
        finally:
            reader.close()
        if reader is raw:
            self.stats.moved(entry.size)
        seen = hasher.digests() if hasher else {}
        if known:
            seen[MD5] = known  # the store refused the put unless the bytes had this MD5
        self._verify(entry, dst_key, result, seen, source_says)
        return result

    def _multipart(self, entry: Entry, dst_key: str) -> Entry:
        psize = self._part_size(entry.size)
        known = self._md5_up_front(entry) if self.dst.abilities.md5_up_front_from else None
        upload_id = self.dst.create_multipart(dst_key, mtime=entry.mtime, mode=self._mode(entry), content_md5=known)
        failed = threading.Event()  # stops the other parts (and their retries) once one failed
        futures: list[Future[Part]] = []
        try:
            for number, offset in enumerate(range(0, entry.size, psize), start=1):
                length = min(psize, entry.size - offset)
                futures.append(self._pool().submit(self._send_part, entry, dst_key, upload_id, number, offset,
                                                   length, failed))
            parts = [f.result() for f in futures]
            self._sweep(dst_key, upload_id)
            result = with_retries(
                lambda: self.dst.complete_multipart(dst_key, upload_id, parts),
                attempts=self.opts.attempts, what=f"complete {dst_key}",
            )
        except BaseException:
            failed.set()
            for f in futures:
                f.cancel()
            # parts still being sent finish first: one stored after the abort would stay behind,
            # an unfinished upload that costs storage and that no listing shows
            wait(futures)
            self._abort(dst_key, upload_id)
            raise
        if not result.etag:  # some servers (Ceph) answer CompleteMultipartUpload without an ETag
            result = self.dst.head(dst_key)
        self._check_size(entry, result, dst_key)
        if known and result.checksums.get(MD5, known) != known:
            self._discard(dst_key)
            raise VerifyFailed(f"{entry.key!r}: the destination reports MD5 {result.checksums[MD5]}, "
                               f"the source has {known}")
        if self.opts.checksum:
            self._verify_by_reading(entry, dst_key, {MD5: known} if known else entry.checksums)
        return result

    def _send_part(self, entry: Entry, dst_key: str, upload_id: str, number: int, offset: int,
                   length: int, failed: threading.Event) -> Part:
        def once() -> Part:
            if failed.is_set():
                raise StorageError(f"{entry.key!r}: part {number} not sent: another part failed", code="Cancelled")
            with self.src.open(entry.key, offset, offset + length) as raw:
                reader = MeteredReader(raw, bucket=self.opts.bucket, cancel=self.cancel,
                                       on_bytes=self.stats.moved)
                data = reader.read(length + 1)
            if len(data) != length:
                raise SourceChanged(f"{entry.key!r}: part {number} read {len(data)} bytes, expected {length}")
            # the store checks the part on arrival (S3: Content-MD5, OSS: CRC64)
            return self.dst.upload_part(dst_key, upload_id, number, data)

        return with_retries(once, attempts=self.opts.attempts, what=f"{entry.key} part {number}",
                            sleep=failed.wait)

    def _ranged_download(self, entry: Entry, dst_key: str) -> Entry:
        psize = self._part_size(entry.size)
        # the ranges are never one stream to hash: where the source reports a checksum, the file
        # is hashed in order as the ranges are written (else read back after the commit) and
        # compared with it
        source_says = self._reported(self.src, entry)
        name = next((n for n in KINDS if n in source_says), None)
        writer = self.dst.open_writer(dst_key, entry.size)
        behind = HashBehind(writer, entry.size, {name}) if name is not None and writer.reads_back else None
        futures: list[Future[None]] = []
        failed = threading.Event()

        def fetch(offset: int, length: int) -> None:
            def once() -> None:
                if failed.is_set():
                    raise StorageError(f"{entry.key!r}: range at {offset} not read: another failed", code="Cancelled")
                if behind is not None:
                    behind.restart(offset, offset + length)
                pos = offset
                with self.src.open(entry.key, offset, offset + length) as raw:
                    reader = MeteredReader(raw, bucket=self.opts.bucket, cancel=self.cancel,
                                           on_bytes=self.stats.moved)
                    while pos < offset + length and (chunk := reader.read(min(MiB, offset + length - pos))):
                        writer.write_at(pos, chunk)
                        if behind is not None:
                            behind.written(pos, pos + len(chunk))
                        pos += len(chunk)
                if pos != offset + length:
                    raise SourceChanged(f"{entry.key!r}: range at {offset} ended {offset + length - pos} bytes short")

            with_retries(once, attempts=self.opts.attempts, what=f"{entry.key} range {offset}", sleep=failed.wait)

        try:
            for offset in range(0, entry.size, psize):
                futures.append(self._pool().submit(fetch, offset, min(psize, entry.size - offset)))
            for f in futures:
                f.result()
            got = behind.digests() if behind is not None else None
            if name is not None and got is not None and got[name] != source_says[name]:
                # refused before the commit: the file never appears under its name
                raise VerifyFailed(f"{entry.key!r}: {name} of the bytes written ({got[name]}) differs from the "
                                   f"source's ({source_says[name]})")
            writer.commit(mtime=entry.mtime, mode=self._mode(entry))
        except BaseException:
            failed.set()
            for f in futures:
                f.cancel()
            wait(futures)  # no range may write into the file after it is gone
            writer.abort()
            raise
        result = self.dst.head(dst_key)
        self._check_size(entry, result, dst_key)
        if name is not None and got is None:
            read = self._read_digests(self.dst, dst_key, {name})[name]
            if read != source_says[name]:
                self._discard(dst_key)
                raise VerifyFailed(f"{entry.key!r}: {name} of the bytes written ({read}) differs from the "
                                   f"source's ({source_says[name]})")
        elif name is None and self.opts.checksum:
            self._verify_by_reading(entry, dst_key, {})
        return result

    # ---- verification -----------------------------------------------------------------------------
    def _stream_hashes(self, source_says: dict[str, str], known: str | None) -> set[str]:
        """What to hash while the bytes pass: every kind the source or the destination may
        report (to compare like with like), MD5 for --checksum; not an MD5 known up front."""
        names = {n for n in KINDS if n in source_says or n in self.dst.abilities.hashes}
        if self.opts.checksum:
            names.add(MD5)
        if known:
            names.discard(MD5)
        return names

    def _verify(self, entry: Entry, dst_key: str, result: Entry, seen: dict[str, str],
                source_says: dict[str, str]) -> None:
        """The bytes that passed (`seen`) against what the source and the destination report of
        the same kind. Whatever fails is removed from the destination: no later sync may skip it."""
        self._check_size(entry, result, dst_key)
        compared = False
        for name, ours in seen.items():
            for side, reported in (("source", source_says.get(name)), ("destination", result.checksums.get(name))):
                if not reported:
                    continue
                compared = compared or side == "destination"
                if reported != ours:
                    self._discard(dst_key)
                    raise VerifyFailed(f"{entry.key!r}: {name} of the bytes sent ({ours}) differs from the "
                                       f"{side}'s ({reported})")
        if self.opts.checksum and not compared:
            self._verify_by_reading(entry, dst_key, seen or source_says)

    def _verify_by_reading(self, entry: Entry, dst_key: str, want: dict[str, str]) -> None:
        """--checksum where the destination reports nothing comparable: read it back and hash;
        `want` holds what the source's bytes are known to hash to (else the source is read too)."""
        name = next((n for n in KINDS if n in want), MD5)
        got = self._read_digests(self.dst, dst_key, {name})[name]
        expected = want.get(name) or self._read_digests(self.src, entry.key, {name})[name]
        if got != expected:
            self._discard(dst_key)
            raise VerifyFailed(f"{entry.key!r}: content at the destination differs from the source ({name})")

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

    def _reported(self, st: Storage, e: Entry) -> dict[str, str]:
        """The checksums `st` reports for `e`: a listing may carry none where a HEAD proves some
        (S3's stored MD5, OSS's CRC64); a store that reports none is not asked."""
        if e.checksums or not st.abilities.hashes:
            return e.checksums
        return st.head(e.key).checksums

    def _md5_up_front(self, entry: Entry) -> str | None:
        """The source's MD5 before its bytes are sent, for a store that checks and keeps it: as
        the source reports it, else by reading a local source once (rclone does the same)."""
        found = self._reported(self.src, entry).get(MD5)
        cheap = self.src.abilities.cheap_rereads
        if found is None and (cheap or self.opts.record_md5):  # a disk read is not under --bwlimit
            found = self._read_digests(self.src, entry.key, {MD5}, throttled=not cheap)[MD5]
        return found

    def _read_digests(self, st: Storage, key: str, names: set[str], throttled: bool = True) -> dict[str, str]:
        hasher = Hasher(names)
        with st.open(key) as f:
            reader = MeteredReader(f, hasher=hasher, bucket=self.opts.bucket if throttled else None,
                                   cancel=self.cancel)
            while reader.read(MiB):
                pass
        return hasher.digests()

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

    def _sweep(self, dst_key: str, upload_id: str) -> None:
        """Before completing, abort the unfinished uploads of this key that the server started
        before ours: parts of an earlier run killed mid-upload, a create whose answer was lost and
        retried by the client (one LIST per large file). Younger ones belong to a writer still at
        work (a job task's next holder) and stay. Best effort: the copy is complete and verified
        without it, and credentials may lack s3:ListBucketMultipartUploads."""
        try:
            self.dst.abort_older_uploads(dst_key, upload_id)
        except StorageError as exc:
            log.warning("could not look for unfinished uploads of %s (the copy itself is complete): %s",
                        dst_key, exc)

    def _discard(self, dst_key: str) -> None:
        """Remove what we just wrote when it cannot be trusted, so no later sync skips it."""
        try:
            self.dst.delete(dst_key)
        except StorageError as exc:
            log.warning("could not remove the unverified copy %s: %s", dst_key, exc)


def _common(a: dict[str, str], b: dict[str, str]) -> bool | None:
    """Equal by the first checksum kind both report; None when they share none."""
    for name in KINDS:
        if name in a and name in b:
            return a[name] == b[name]
    return None
