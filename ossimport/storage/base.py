"""The storage contract every backend implements.

A `Storage` is bound to one root (a local directory, a bucket plus prefix, an SFTP directory).
Every key it takes or yields is *relative to that root*, '/'-separated, never starting with '/'.
The engine works only in relative keys, so one copy loop serves every pair of backends.

Required of every backend: `list`, `head`, `open`, `put`, `delete`.
Optional abilities are declared in `Abilities` and checked by the engine, never assumed:
multipart upload, random-access writes (parallel ranged download into a file), server-side copy,
setting mtime, POSIX mode, symlinks, reported checksums.
"""

from __future__ import annotations

import io
import itertools
import logging
import posixpath
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ossimport.errors import StorageError, UnsafeKey

if TYPE_CHECKING:
    from ossimport.address import Location

log = logging.getLogger("ossimport")

# Checksum names used across the project. Values are stored as strings:
#   md5     lower-case hex of the whole content
#   crc64   CRC-64/ECMA-182 as OSS computes it, decimal string
# A backend puts one in Entry.checksums (or a reader's `checksums`) only when it knows the value
# is that checksum of the content: an ETag is not one by itself (SSE-KMS/SSE-C objects, multipart
# and OSS appendable objects have ETags that are no MD5), so Entry.etag is opaque to the engine.
MD5 = "md5"
CRC64 = "crc64"


@dataclass(slots=True)
class Entry:
    """One listed object or file. `key` is relative to the storage root."""

    key: str
    size: int
    mtime: float  # seconds since the epoch, UTC
    etag: str | None = None  # the store's ETag, unquoted: opaque, never taken for a checksum
    checksums: dict[str, str] = field(default_factory=dict)  # name -> value, only where known
    mode: int | None = None  # POSIX permission bits, where the store keeps them
    link_target: str | None = None  # symlink target, when the entry is a link that was not followed


@dataclass(frozen=True, slots=True)
class Abilities:
    """What a backend can do beyond the required five operations."""

    multipart: bool = False  # create/upload_part/complete/abort/list_parts
    random_write: bool = False  # open_writer(): write ranges at offsets, then commit atomically
    ranged_read: bool = True  # open(key, start, end)
    server_side_copy: bool = False  # copy() within the same store
    set_mtime: bool = False  # put(..., mtime=) makes head().mtime equal to it (to the second)
    posix_mode: bool = False
    symlinks: bool = False
    # checksums that head(), put(), complete_multipart() and whole-object open() readers may
    # report (where the store knows them), e.g. {"crc64"} for OSS: what the engine computes
    # while the bytes stream, to compare like with like
    hashes: frozenset[str] = frozenset()
    # put() of at least this many bytes and every create_multipart() take the content's MD5 when
    # the caller knows it before sending (content_md5=): the store checks the bytes against it and
    # keeps it with the object (S3: x-amz-meta-md5chksum), so it can be compared later without a
    # read-back. Smaller puts are hashed by the backend itself. 0: the store has no use for it.
    md5_up_front_from: int = 0
    # reading the content a second time costs a local disk read, not a transfer: the engine may
    # hash such a source before an upload to hand the store its MD5 up front (local files)
    cheap_rereads: bool = False
    min_part_size: int = 5 * 1024 * 1024
    max_part_size: int = 5 * 1024 * 1024 * 1024
    max_parts: int = 10000
    read_only: bool = False
    # files can change in place while we read them (file systems); immutable objects cannot,
    # so only these sources are re-checked after a copy to catch a change mid-transfer
    mutable_files: bool = False


@dataclass(frozen=True, slots=True)
class Upload:
    """An unfinished multipart upload. `initiated`: when the server started it (epoch seconds,
    its own clock; 0 when the server does not say)."""

    key: str
    upload_id: str
    initiated: float = 0.0


@dataclass(slots=True)
class StorageOptions:
    """Connection settings that come from global CLI options or the job config, not the address."""

    https: bool = False
    connect_timeout: float = 30.0
    read_timeout: float = 120.0
    anonymous: bool = False
    max_pool: int = 10  # connections to keep: at least the number of worker threads
    threads: int = 10  # requests a listing may have in flight at once (the run's --threads)
    follow_symlinks: bool = False
    keep_perms: bool = True  # --noperms turns it off
    # SFTP: record the key of a server not in known_hosts instead of refusing it (--trust-new-hosts)
    trust_new_hosts: bool = False
    # keys of symbolic links that were not copied (file, directory, dangling links and loops):
    # the CLI's --recordName
    skipped_links: list[str] = field(default_factory=list)
    # http list source: 1-based columns of the URL prefix and the relative key in each line
    http_prefix_column: int = 1
    http_key_column: int = 2


class Writer(ABC):
    """A file being written in ranges (parallel ranged download). Nothing is visible under the
    final key until `commit`; `abort` removes every trace."""

    # read_at() costs no transfer (a local file: the page cache): the engine hashes the written
    # ranges in file order while others still arrive (engine/behind.py) instead of reading the
    # whole file back after the commit
    reads_back: ClassVar[bool] = False

    @abstractmethod
    def write_at(self, offset: int, data: bytes) -> None: ...

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes written at `offset`, before the commit (where `reads_back`)."""
        raise NotImplementedError

    @abstractmethod
    def commit(self, mtime: float | None = None, mode: int | None = None) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class StreamReader(io.RawIOBase):
    """Base of the backends' streaming response readers: a subclass implements `_read_some(n)`
    (at most n bytes, b"" at the end); reads of any size, `readall` and `readinto` follow."""

    chunk = 1024 * 1024  # what read(-1) asks for at a time

    def _read_some(self, n: int) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self._read_some(self.chunk):
                chunks.append(chunk)
            return b"".join(chunks)
        return self._read_some(size) if size else b""

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self._read_some(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass(slots=True)
class Part:
    number: int  # 1-based
    etag: str
    size: int = 0


class Storage(ABC):
    """A place where bytes live. Subclasses are registered in `ossimport.storage.REGISTRY`."""

    scheme: ClassVar[str] = ""
    abilities: ClassVar[Abilities] = Abilities()

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        self.location = location
        self.options = options or StorageOptions()
        # what a listing had to leave out (an unreadable directory, a failed HEAD): the listing is
        # incomplete, so the engine reports these and refuses to delete destination extras
        self.list_errors: list[str] = []
        # temporary files of writes that an earlier run never finished (killed, a second
        # Ctrl-C), met by a listing of a file system: the engine removes them after the copy phase
        self.old_temps: list[str] = []
        self.opened = time.time()  # what "earlier" means: temp files last written before this

    # ---- required ---------------------------------------------------------------------------
    @abstractmethod
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        """Every file/object under the root whose key starts with `prefix` and is > `start_after`,
        recursively, sorted by key in byte order (UTF-8; a directory `d` sorts as `d/`).
        Streams: never holds the whole listing. Directories themselves are not yielded."""

    @abstractmethod
    def head(self, key: str) -> Entry:
        """The entry for `key`; raises `NotFound` when it does not exist."""

    @abstractmethod
    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A streaming reader of bytes [start, end) (end exclusive, None = to the end), used by
        the thread that opened it. The caller closes it. Raises `NotFound`. Follows symlinks.
        A reader of the whole object may have a `checksums` dict (see `reader_checksums`): what
        the store's answer says the content's checksums are."""

    @abstractmethod
    def put(
        self,
        key: str,
        data: BinaryIO,
        size: int,
        *,
        mtime: float | None = None,
        mode: int | None = None,
        content_md5: str | None = None,
    ) -> Entry:
        """Store exactly `size` bytes read from `data` under `key`, atomically: readers see the
        old content or the whole new content, never a part. Returns the new entry as far as the
        store tells without another request (size, etag and checksums where known). Raises
        `StorageError` if `data` yields fewer or more than `size` bytes (code SIZE_NOT_MATCH),
        writing nothing. `content_md5` (hex), when given, is the MD5 the bytes must have (see
        `Abilities.md5_up_front_from`); a store that can check it refuses other bytes."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`. Deleting a missing key is not an error."""

    # ---- optional abilities (declared in `abilities`) ----------------------------------------
    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None,
                         content_md5: str | None = None) -> str:
        """Start a multipart upload; `content_md5` (hex): the whole content's MD5, kept with the
        object where the store can (see `Abilities.md5_up_front_from`)."""
        raise self._unsupported("multipart upload")

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        """Store one part; the backend has the store check the bytes on arrival where it can."""
        raise self._unsupported("multipart upload")

    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        raise self._unsupported("multipart upload")

    def abort_multipart(self, key: str, upload_id: str) -> None:
        raise self._unsupported("multipart upload")

    def list_uploads(self, prefix: str = "") -> Iterator[Upload]:
        """Unfinished multipart uploads under the root."""
        raise self._unsupported("multipart upload")

    def list_multipart(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        """(key, upload_id) of unfinished multipart uploads under the root."""
        return ((u.key, u.upload_id) for u in self.list_uploads(prefix))

    def abort_older_uploads(self, key: str, upload_id: str) -> int:
        """Abort the unfinished uploads of `key` that the server started before `upload_id` (itself
        unfinished): an earlier run killed mid-upload, a create whose answer was lost and retried.
        An upload started after ours belongs to another writer still at work (a task's next holder,
        see jobs/master.py) and is left alone. Times come from one listing, so from one clock;
        where they tie or are missing, the listing's order decides (S3 lists the uploads of a key
        oldest first)."""
        uploads = [u for u in self.list_uploads(prefix=key) if u.key == key]
        ours = next((i for i, u in enumerate(uploads) if u.upload_id == upload_id), None)
        if ours is None:
            return 0  # not listed: nothing to compare with, and aborting could hit another writer
        mine = uploads[ours].initiated
        removed = 0
        for i, u in enumerate(uploads):
            timed = bool(u.initiated and mine and u.initiated != mine)
            if (u.initiated < mine) if timed else i < ours:
                self.abort_multipart(key, u.upload_id)
                removed += 1
        return removed

    def open_writer(self, key: str, size: int) -> Writer:
        raise self._unsupported("random-access writes")

    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        """Server-side copy. `src_root` is another Storage of the same class and the same server
        (another bucket or prefix); None means this one. `size`, when the caller knows it from a
        listing, spares a HEAD."""
        raise self._unsupported("server-side copy")

    def check_name(self, key: str) -> None:
        """Refuse, before a copy, a key this destination cannot store (UnsafeKey): object stores
        need UTF-8 names; file systems override this with their path rules."""
        check_utf8(key)

    def same_server(self, other: Storage) -> bool:
        """True when `copy(..., src_root=other)` can work (same endpoint and credentials)."""
        return False

    def list_dirs(self, prefix: str = "") -> list[str]:
        """The directories one level below `prefix` ("" or ending in '/'), as sorted keys ending
        in '/': what a delimiter listing calls common prefixes. Lets a job scan in parallel."""
        raise self._unsupported("listing one level")

    def list_level(self, prefix: str = "", limit: int | None = None) -> Iterator[Entry]:
        """What `ls` of the directory `prefix` ("" or ending in '/') shows, streaming: the files
        directly in it as entries, and each directory one level below as an entry whose key ends
        in '/' (size 0). Not sorted across kinds. `limit`: at most that many entries (one small
        request answers "is anything there?"). Object stores override this with one delimiter
        listing; this default jumps over each subdirectory with a new `list` (one request per
        subdirectory) and adds, at the end, directories that hold only markers."""
        if limit is not None:
            yield from itertools.islice(self.list_level(prefix), limit)
            return
        seen: set[str] = set()
        after = ""
        while True:
            jumped = False
            for entry in self.list(prefix, after):
                rest = entry.key[len(prefix):]
                slash = rest.find("/")
                if slash < 0:
                    yield entry
                    continue
                sub = prefix + rest[: slash + 1]
                if sub in seen:
                    continue  # a key sorting after the jump point below (U+10FFFF in a name)
                seen.add(sub)
                yield Entry(sub, 0, entry.mtime)
                after, jumped = sub + "\U0010ffff", True  # past every ordinary key under `sub`
                break
            if not jumped:
                break
        for sub in self.list_dirs(prefix):
            if sub not in seen:
                yield Entry(sub, 0, 0.0)

    def remove_stale_temps(self, keys: list[str], older_than: float | None = None) -> int:
        """Remove what interrupted writes of `keys` left behind (a process killed mid-copy cannot
        clean up): temporary files on file systems, unfinished multipart uploads (which cost
        storage until aborted) on object stores. `older_than` (epoch seconds): what was written or
        started since then stays (another writer may be at work). Returns how many were removed."""
        if not self.abilities.multipart:
            return 0
        removed = 0
        for key in keys:
            for up in list(self.list_uploads(prefix=key)):
                if up.key == key and (older_than is None or up.initiated < older_than):
                    self.abort_multipart(up.key, up.upload_id)
                    removed += 1
        return removed

    def reopen(self) -> Storage:
        """A new instance for the same root that shares no connection with this one (for a
        forked copy process, see engine/fanout.py)."""
        return type(self)(self.location, self.options)

    def can_reopen(self) -> bool:
        """Whether `reopen()` works without asking the user anything."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections. Safe to call twice."""

    # ---- shared helpers ----------------------------------------------------------------------
    def describe(self) -> str:
        """A human name for messages: never contains a secret."""
        return self.location.display()

    def _list_error(self, message: str) -> None:
        """A listing had to leave something out: logged, and kept in `list_errors`."""
        log.warning("cannot list %s", message)
        self.list_errors.append(message)

    def _old_temp(self, key: str, mtime: float) -> None:
        """A listing met our temp file `key` (listings hide them): kept for removal when it was
        last written before this storage was opened, so a concurrent run's write is left alone."""
        if mtime < self.opened and len(self.old_temps) < 100_000:
            self.old_temps.append(key)

    def _skipped(self, key: str, reason: str) -> None:
        """A symbolic link not copied: recorded for --recordName."""
        log.info("skipped %s: %s", key, reason)
        self.options.skipped_links.append(key)

    def _unsupported(self, what: str) -> StorageError:
        return StorageError(f"{self.scheme} storage does not support {what}", code="NotImplemented")

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reader_checksums(reader: object) -> dict[str, str]:
    """The checksums a reader from `open()` of a whole object reports ({} when none)."""
    found = getattr(reader, "checksums", None)
    return dict(found) if isinstance(found, dict) else {}


def check_relative(key: str) -> str:
    """Refuse keys that cannot name a file under a root without leaving it: absolute, `..` or `.`
    segments, empty segments (`a//b`), NUL. Returns the key unchanged when it is safe.

    File-system backends call this before reading, so a key such as `../../etc/passwd` can never
    reach outside the root."""
    if not key:
        raise UnsafeKey("empty key")
    if "\x00" in key:
        raise UnsafeKey(f"key contains NUL: {key!r}")
    if key.startswith("/"):
        raise UnsafeKey(f"key is absolute: {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise UnsafeKey(f"key has an empty, '.' or '..' segment: {key!r}")
    return key


def check_key(key: str) -> str:
    """`check_relative`, and no backslash: the rule for a key written into a file system (a
    backslash is a path separator wherever the files may be read from Windows or a share).

    File-system backends call this before writing, so an object key such as
    `../../etc/passwd` can never be written outside the destination directory."""
    if "\\" in key:
        raise UnsafeKey(f"key contains a backslash: {key!r}")
    return check_relative(key)


def check_utf8(key: str) -> str:
    """Refuse a key that is not valid UTF-8: object stores and SFTP servers take names as UTF-8.
    A local file name in another encoding is listed with surrogate escapes for its bytes."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raw = key.encode("utf-8", "surrogateescape")
        raise UnsafeKey(f"the name {raw!r} is not valid UTF-8, which the destination needs: rename the "
                        "file (e.g. convmv -f OLD-ENCODING -t utf-8)") from None
    return key


def join_key(prefix: str, key: str) -> str:
    """prefix + key for object stores, where prefix is '' or ends with '/'."""
    return prefix + key if not prefix or prefix.endswith("/") else f"{prefix}/{key}"


def parent_key(key: str) -> str:
    return posixpath.dirname(key)
