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
#   etag    the store's ETag, unquoted (md5 hex for single PUTs on S3/OSS, "<hex>-N" for multipart)
MD5 = "md5"
CRC64 = "crc64"


@dataclass(slots=True)
class Entry:
    """One listed object or file. `key` is relative to the storage root."""

    key: str
    size: int
    mtime: float  # seconds since the epoch, UTC
    etag: str | None = None
    checksums: dict[str, str] = field(default_factory=dict)
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
    # checksums that list()/head() report without reading the content, e.g. {"crc64"} for OSS.
    # An S3-style MD5 ETag is reported as Entry.etag, not here: it is md5 only for single PUTs.
    hashes: frozenset[str] = frozenset()
    etag_is_md5: bool = False  # a non-multipart ETag equals the content MD5 (S3, OSS)
    min_part_size: int = 5 * 1024 * 1024
    max_part_size: int = 5 * 1024 * 1024 * 1024
    max_parts: int = 10000
    read_only: bool = False
    # files can change in place while we read them (file systems); immutable objects cannot,
    # so only these sources are re-checked after a copy to catch a change mid-transfer
    mutable_files: bool = False


@dataclass(slots=True)
class StorageOptions:
    """Connection settings that come from global CLI options or the job config, not the address."""

    https: bool = False
    connect_timeout: float = 30.0
    read_timeout: float = 120.0
    anonymous: bool = False
    max_pool: int = 10  # connections to keep: at least the number of worker threads
    follow_symlinks: bool = False
    keep_perms: bool = True  # --noperms turns it off
    # keys of symbolic links that were not copied (file, directory, dangling links and loops):
    # the CLI's --recordName
    skipped_links: list[str] = field(default_factory=list)
    # http list source: 1-based columns of the URL prefix and the relative key in each line
    http_prefix_column: int = 1
    http_key_column: int = 2


class Writer(ABC):
    """A file being written in ranges (parallel ranged download). Nothing is visible under the
    final key until `commit`; `abort` removes every trace."""

    @abstractmethod
    def write_at(self, offset: int, data: bytes) -> None: ...

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
        the thread that opened it. The caller closes it. Raises `NotFound`. Follows symlinks."""

    @abstractmethod
    def put(
        self,
        key: str,
        data: BinaryIO,
        size: int,
        *,
        mtime: float | None = None,
        mode: int | None = None,
    ) -> Entry:
        """Store exactly `size` bytes read from `data` under `key`, atomically: readers see the
        old content or the whole new content, never a part. Returns the new entry as far as the
        store tells without another request (size, etag where known). Raises `StorageError` if
        `data` yields fewer or more than `size` bytes (code SIZE_NOT_MATCH), writing nothing."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`. Deleting a missing key is not an error."""

    # ---- optional abilities (declared in `abilities`) ----------------------------------------
    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None) -> str:
        raise self._unsupported("multipart upload")

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        raise self._unsupported("multipart upload")

    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        raise self._unsupported("multipart upload")

    def abort_multipart(self, key: str, upload_id: str) -> None:
        raise self._unsupported("multipart upload")

    def list_multipart(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        """(key, upload_id) of unfinished multipart uploads under the root."""
        raise self._unsupported("multipart upload")

    def open_writer(self, key: str, size: int) -> Writer:
        raise self._unsupported("random-access writes")

    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        """Server-side copy. `src_root` is another Storage of the same class and the same server
        (another bucket or prefix); None means this one. `size`, when the caller knows it from a
        listing, spares a HEAD."""
        raise self._unsupported("server-side copy")

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
        storage until aborted) on object stores. `older_than` (epoch seconds): file systems keep
        temps written since then (another writer may be at work). Returns how many were removed."""
        if not self.abilities.multipart:
            return 0
        removed = 0
        for key in keys:
            for found, upload_id in list(self.list_multipart(prefix=key)):
                if found == key:
                    self.abort_multipart(found, upload_id)
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


def check_key(key: str) -> str:
    """Refuse keys that cannot name a file under a root: absolute, `..` or `.` segments, empty
    segments (`a//b`), NUL, backslash. Returns the key unchanged when it is safe.

    File-system backends call this before touching the disk, so an object key such as
    `../../etc/passwd` can never be written outside the destination directory."""
    if not key:
        raise UnsafeKey("empty key")
    if "\x00" in key:
        raise UnsafeKey(f"key contains NUL: {key!r}")
    if key.startswith("/"):
        raise UnsafeKey(f"key is absolute: {key!r}")
    if "\\" in key:
        raise UnsafeKey(f"key contains a backslash: {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise UnsafeKey(f"key has an empty, '.' or '..' segment: {key!r}")
    return key


def join_key(prefix: str, key: str) -> str:
    """prefix + key for object stores, where prefix is '' or ends with '/'."""
    return prefix + key if not prefix or prefix.endswith("/") else f"{prefix}/{key}"


def parent_key(key: str) -> str:
    return posixpath.dirname(key)
