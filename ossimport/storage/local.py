"""Local file system backend, plus the sorted directory walk shared by every file-system backend.

Keys are paths relative to the root directory. Writes go to a hidden temp file in the target
directory and are renamed into place, so readers never see half a file; a key can never make us
write outside the root (checked lexically by `check_key` and physically with realpath).
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Generator, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple, cast

from ossimport.errors import NotFound, StorageError, UnsafeKey
from ossimport.storage import sorting
from ossimport.storage.base import (
    Abilities,
    Entry,
    Storage,
    StorageOptions,
    Writer,
    check_key,
    check_relative,
)

if TYPE_CHECKING:
    from ossimport.address import Location

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024

# ---- shared by file-system backends (local, sftp) ---------------------------------------------

NodeKind = Literal["file", "dir", "skip"]


class Node(NamedTuple):
    """One directory entry as a backend's `scan` reports it to `sorted_walk`.

    kind "file": listed (through `make_entry`); "dir": descended into; "skip": not listed, reported
    to `on_skip` with `ref` as the reason (a symlink not followed, a dangling link).
    `ident` names a directory's physical identity for symlink-loop detection (None: no check); it
    must be marshal-able (a str, a tuple of ints): a large directory is sorted on disk.
    `ref` is whatever the backend needs later (a DirEntry, a stat result, SFTP attributes); in a
    directory sorted on disk, a file's ref is what `sorted_walk`'s `plain` made of it."""

    name: str
    kind: NodeKind
    ident: Hashable | None = None
    ref: Any = None


FileFields = tuple[int, float, int | None]  # (size, mtime, permission bits): a file's ref as plain data


def fields_entry(key: str, fields: FileFields) -> Entry:
    size, mtime, mode = fields
    return Entry(key, size, mtime, mode=mode)


def _b(s: str) -> bytes:
    # surrogateescape: names that are not valid UTF-8 still sort by their raw bytes
    return s.encode("utf-8", "surrogateescape")


def _sort_name(node: Node) -> str:
    # object-store order: directory `d` sorts as "d/", so "a/x" < "a0" and "a-b" < "a/x"
    return node.name + "/" if node.kind == "dir" else node.name


def _sort_key(node: Node) -> bytes:
    return _b(_sort_name(node))


def _may_contain(dir_b: bytes, prefix_b: bytes, after_b: bytes) -> bool:
    """Can a key under the directory `dir_b` (ending in b'/') start with prefix and be > after?"""
    if not (dir_b.startswith(prefix_b) or prefix_b.startswith(dir_b)):
        return False
    # every key below is dir_b + something: all are > after when dir_b > after, unless after lies
    # inside the directory itself
    return dir_b > after_b or after_b.startswith(dir_b)


def _no_plain(ref: Any) -> None:
    return None


def _sorted_nodes(nodes: Iterable[Node], plain: Callable[[Any], Any]) -> Generator[Node, None, None]:
    """One directory's `nodes` in byte order of their sort names. Up to sorting.RUN_SIZE of them
    are sorted in memory as they are (refs kept); a longer directory goes through the external sort
    as plain records (sort name, kind, ident, plain ref), so memory holds one run however long it is.
    The whole directory is read before the first node comes out (one listing open at a time)."""
    size = max(1, sorting.RUN_SIZE)
    it = iter(nodes)
    try:
        first = list(itertools.islice(it, size + 1))
        if len(first) <= size:
            first.sort(key=_sort_key)
            yield from first
            return

        def records() -> Iterator[sorting.Record]:
            first.reverse()  # popped from the end: each node freed as its record is made
            while first:
                yield _record(first.pop(), plain)
            for node in it:
                yield _record(node, plain)

        spilled = sorting.sorted_records(records(), run_size=size)
        try:
            for sort_name, kind, ident, ref in spilled:
                yield Node(sort_name[:-1] if kind == "dir" else sort_name, kind, ident, ref)
        finally:
            spilled.close()  # its temporary files, when the walk stops early or fails
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # the backend's open listing (a scandir, an SFTP handle)


def _record(node: Node, plain: Callable[[Any], Any]) -> sorting.Record:
    ref = plain(node.ref) if node.kind == "file" else node.ref  # a skip's ref is its reason (a str)
    return (_sort_name(node), node.kind, node.ident, ref)


def sorted_walk(
    scan: Callable[[str, Hashable | None], Iterable[Node]],
    make_entry: Callable[[str, Node], Entry | None],
    *,
    prefix: str = "",
    start_after: str = "",
    root_ident: Hashable | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    plain: Callable[[Any], Any] = _no_plain,
) -> Iterator[Entry]:
    """Walk a directory tree yielding files in global UTF-8 byte order of their keys.

    `scan(dir_key, ident)` lists one directory ("" is the root, else "a/b/"), best as a generator:
    a directory of up to sorting.RUN_SIZE entries is sorted in memory, a longer one in runs spilled
    to temporary files (see `_sorted_nodes`), so memory holds at most one run per level of depth.
    `plain(ref)` reduces a file's ref to marshal-able data that `make_entry` takes in its place for
    a directory sorted on disk (default None: make_entry looks the file up again).
    Directories that cannot hold a key starting with `prefix` and greater than `start_after` are
    never scanned. A directory whose `ident` is already on the current path is a symlink loop:
    reported to `on_skip`, not entered.
    """
    prefix_b, after_b = _b(prefix), _b(start_after)
    ancestors: set[Hashable] = set()
    stack: list[tuple[Generator[Node, None, None], str, Hashable | None]] = []

    def enter(dir_key: str, ident: Hashable | None) -> None:
        stack.append((_sorted_nodes(scan(dir_key, ident), plain), dir_key, ident))
        if ident is not None:
            ancestors.add(ident)

    try:
        enter("", root_ident)
        while stack:
            nodes, dir_key, dir_ident = stack[-1]
            node = next(nodes, None)
            if node is None:
                stack.pop()
                if dir_ident is not None:
                    ancestors.discard(dir_ident)
                continue
            key = dir_key + node.name
            key_b = _b(key)
            if node.kind == "dir":
                if not _may_contain(key_b + b"/", prefix_b, after_b):
                    continue
                if node.ident is not None and node.ident in ancestors:
                    if on_skip:
                        on_skip(key, "symlink loop")
                    continue
                enter(key + "/", node.ident)
            elif node.kind == "file":
                if key_b.startswith(prefix_b) and key_b > after_b:
                    entry = make_entry(key, node)
                    if entry is not None:
                        yield entry
            elif on_skip and (
                _may_contain(key_b + b"/", prefix_b, after_b) or (key_b.startswith(prefix_b) and key_b > after_b)
            ):
                on_skip(key, str(node.ref))
    finally:
        for nodes, _, _ in reversed(stack):  # a walk closed early or failed: the open levels' sorts
            nodes.close()


_TEMP_RE = re.compile(r"\A\..*\.ossimport\.[0-9a-f]{16}\.tmp\Z", re.DOTALL)
_NAME_MAX = 255


def _new_temp_series() -> None:
    # 16 hex digits: a random per-process half and a counter (a getrandom() call per file was a
    # syscall, and every syscall is a GIL hand-off between the copy threads). O_EXCL stays the
    # guard against a clash with another process.
    global _temp_prefix, _temp_counter
    _temp_prefix = secrets.token_hex(4)
    _temp_counter = itertools.count(secrets.randbits(32))


_temp_prefix = ""
_temp_counter = itertools.count()
_new_temp_series()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_temp_series)


def temp_name(name: str) -> str:
    """Hidden temp file name for `name` in the same directory; fits in NAME_MAX bytes."""
    raw = _b(name)[: _NAME_MAX - 32]  # 32 = len(".") + len(".ossimport.") + 16 hex + len(".tmp")
    short = raw.decode("utf-8", "surrogateescape")
    return f".{short}.ossimport.{_temp_prefix}{next(_temp_counter) & 0xFFFFFFFF:08x}.tmp"


def is_temp_name(name: str) -> bool:
    """Our own unfinished writes are not data: listings hide them."""
    return bool(_TEMP_RE.match(name))


def stale_temps(keys: list[str], listdir: Callable[[str], list[tuple[str, float]]],
                older_than: float | None = None) -> Iterator[str]:
    """Relative paths of our temp files that belong to `keys`, looking into each key's directory
    once. `listdir(rel_dir)` returns (name, mtime) pairs, or [] for a missing directory. With
    `older_than`, only temps last written before that time: a writer still at work (another
    holder of the same task) keeps its file."""
    by_dir: dict[str, set[str]] = {}
    for key in keys:
        d, _, name = key.rpartition("/")
        by_dir.setdefault(d, set()).add(temp_name(name).rsplit(".ossimport.", 1)[0])
    for d, owners in by_dir.items():
        for entry, mtime in listdir(d):
            if (is_temp_name(entry) and entry.rsplit(".ossimport.", 1)[0] in owners
                    and (older_than is None or mtime < older_than)):
                yield f"{d}/{entry}" if d else entry


def read_exact(data: BinaryIO, size: int, write: Callable[[bytes], object], key: str) -> None:
    """Copy exactly `size` bytes from `data` to `write`, reading one byte more to catch extras."""
    remaining = size
    while remaining > 0:
        chunk = data.read(min(CHUNK, remaining))
        if not chunk:
            raise size_mismatch(key, size, size - remaining)
        write(chunk)
        remaining -= len(chunk)
    if data.read(1):
        raise size_mismatch(key, size, None)


def size_mismatch(key: str, expected: int, got: int | None) -> StorageError:
    what = f"only {got} bytes" if got is not None else "more bytes than that"
    return StorageError(
        f"{key}: expected {expected} bytes but the source gave {what}; it probably changed during the copy",
        code="SIZE_NOT_MATCH",
    )


# ---- local backend ------------------------------------------------------------------------------


def _plain(ref: Any) -> FileFields | None:
    """A file's ref as plain data for a directory sorted on disk: a stat result's fields; a DirEntry
    has none before its stat (None: `_entry` makes the lstat the DirEntry would have made)."""
    if isinstance(ref, os.stat_result):
        return (ref.st_size, ref.st_mtime, stat.S_IMODE(ref.st_mode))
    return None


def _os_error(e: OSError, path: str, action: str) -> StorageError:
    reason = e.strerror or str(e)
    msg = f"cannot {action} {path}: {reason}"
    if e.errno == errno.ENOENT:
        return NotFound(msg)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(msg, code="AccessDenied")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(msg, code="NoSpaceLeft")
    if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
        return StorageError(msg, code="PathConflict")
    if e.errno == errno.ENAMETOOLONG:
        return StorageError(msg, code="InvalidObjectName")
    return StorageError(msg, code="IOError", retryable=e.errno in (errno.EIO, errno.EAGAIN, errno.EINTR))


class LocalStorage(Storage):
    scheme = "local"
    abilities = Abilities(random_write=True, set_mtime=True, posix_mode=True, ranged_read=True,
                          mutable_files=True, cheap_rereads=True)

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        self.root = os.path.abspath(location.path)
        self._root_real = os.path.realpath(self.root)
        # directories this storage made or found (a makedirs per file is two syscalls, each a GIL
        # hand-off); dropped again when a write finds one gone
        self._dirs: set[str] = set()
        self._plain: set[str] = set()  # parent keys found to have no symlinked directory on the way
        # unreadable directories and files met while listing: "path: reason". The listing goes on;
        # callers that delete by comparison must check this before trusting the listing.

    # ---- paths ------------------------------------------------------------------------------
    def list_dirs(self, prefix: str = "") -> list[str]:
        base = os.path.join(self.root, prefix)
        try:
            with os.scandir(base) as it:
                names = [d.name for d in it
                         if d.is_dir(follow_symlinks=self.options.follow_symlinks) and not is_temp_name(d.name)]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _os_error(e, base, "list") from None
        return sorted((f"{prefix}{n}/" for n in names), key=lambda k: k.encode("utf-8", "surrogateescape"))

    def remove_stale_temps(self, keys: list[str], older_than: float | None = None) -> int:
        def listdir(d: str) -> list[tuple[str, float]]:
            found = []
            try:
                with os.scandir(os.path.join(self.root, d)) as it:
                    for de in it:
                        if is_temp_name(de.name):
                            with contextlib.suppress(OSError):
                                found.append((de.name, de.stat(follow_symlinks=False).st_mtime))
            except OSError:
                return []
            return found

        removed = 0
        for rel in stale_temps(keys, listdir, older_than):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, rel))
                removed += 1
        return removed

    def local_path(self, key: str) -> str:
        """The file name for `key`, refusing keys whose directory resolves outside the root."""
        check_relative(key)
        path = os.path.join(self.root, key)
        # The key has no '..' (check_relative), so only a symlink among the directories below the root
        # can lead out of it: lstat those (one call for "dir/file", where realpath() would lstat
        # every component of the whole path) and resolve the parent fully only if one is a link.
        parent = key.rpartition("/")[0]
        if not parent or parent in self._plain:
            return path
        sub = self.root
        for part in parent.split("/"):
            sub = f"{sub}/{part}"
            try:
                if not stat.S_ISLNK(os.lstat(sub).st_mode):
                    continue
            except OSError:
                return path  # missing (makedirs makes a real directory) or not a directory: no link
            break
        else:
            # no link on the way: the next keys in this directory need no lstat (one syscall a
            # file); a directory this run removes is forgotten (delete() below)
            if len(self._plain) > 100_000:
                self._plain.clear()
            self._plain.add(parent)
            return path
        parent_real = os.path.realpath(os.path.dirname(path))
        if parent_real != self._root_real and not parent_real.startswith(self._root_real.rstrip("/") + "/"):
            raise UnsafeKey(
                f"key {key!r}: its directory resolves to {parent_real}, outside the root {self._root_real} "
                "(a symlinked directory in the destination?)"
            )
        return path

    def _make_parents(self, key: str, path: str) -> None:
        directory = os.path.dirname(path)
        if directory in self._dirs:
            return
        try:
            os.makedirs(directory, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise self._conflict(key) from None
        except OSError as e:
            raise _os_error(e, directory, "create directory") from None
        if len(self._dirs) > 100_000:
            self._dirs.clear()
        self._dirs.add(directory)

    def _conflict(self, key: str) -> StorageError:
        """Name the first path component of `key` that is a file where a directory is needed."""
        parts = key.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = os.path.join(self.root, *parts[:i])
            if os.path.lexists(p) and not os.path.isdir(p):
                return StorageError(
                    f"cannot write {key}: {p} is a file, but a directory is needed there", code="PathConflict"
                )
        return StorageError(f"cannot create the directories for {key}", code="PathConflict")

    def _create_temp(self, key: str, path: str, access: int = os.O_WRONLY) -> tuple[str, int]:
        directory, name = os.path.split(path)
        # a concurrent delete() may remove the parent between makedirs and open: retry a little
        for attempt in range(3):
            self._make_parents(key, path)
            tmp = os.path.join(directory, temp_name(name))
            try:
                return tmp, os.open(tmp, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                self._dirs.discard(directory)
                if attempt == 2:
                    raise StorageError(f"cannot create a temp file in {directory}", code="IOError") from None
            except OSError as e:
                raise _os_error(e, tmp, "create") from None
        raise AssertionError("unreachable")

    def _finish(self, fd: int, tmp: str, path: str, key: str, mtime: float | None, mode: int | None) -> Entry:
        """chmod/utime the temp file, rename it over `path`; returns the entry. Closes fd."""
        try:
            if mode is not None and self.options.keep_perms:
                os.fchmod(fd, mode & 0o7777)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            st = os.fstat(fd)
        except OSError as e:
            raise _os_error(e, tmp, "set the mode/mtime of") from None
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError as e:
            if os.path.isdir(path):
                raise StorageError(f"cannot write {key}: {path} is a directory", code="PathConflict") from None
            raise _os_error(e, path, "rename into") from None
        return Entry(key, st.st_size, st.st_mtime, mode=stat.S_IMODE(st.st_mode))

    # ---- listing ----------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _os_error(e, self.root, "list") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{self.root} is not a directory", code="PathConflict")
        root_ident = (st.st_dev, st.st_ino) if self.options.follow_symlinks else None
        yield from sorted_walk(
            self._scan, self._entry, prefix=prefix, start_after=start_after,
            root_ident=root_ident, on_skip=self._skipped, plain=_plain,
        )

    def _scan(self, dir_key: str, ident: Hashable | None) -> Iterator[Node]:
        """One directory's nodes, read as they come (a directory of millions is never held whole
        here: `sorted_walk` sorts it in bounded memory)."""
        path = os.path.join(self.root, dir_key[:-1]) if dir_key else self.root
        follow = self.options.follow_symlinks
        try:
            it = os.scandir(path)
        except FileNotFoundError:
            return  # vanished while we walked
        except OSError as e:
            self._scan_error(e, path, dir_key)
            return
        with it:
            while True:
                try:
                    de = next(it, None)
                except OSError as e:  # a read error part way: what was read is listed, the error recorded
                    self._scan_error(e, path, dir_key)
                    return
                if de is None:
                    return
                node = self._node(de, dir_key, follow)
                if node is not None:
                    yield node

    def _scan_error(self, e: OSError, path: str, dir_key: str) -> None:
        if not dir_key:
            raise _os_error(e, path, "list") from None
        self._list_error(f"{path}: {e.strerror or e}")

    def _node(self, de: os.DirEntry[str], dir_key: str, follow: bool) -> Node | None:
        if is_temp_name(de.name):
            with contextlib.suppress(OSError):
                self._old_temp(dir_key + de.name, de.stat(follow_symlinks=False).st_mtime)
            return None
        try:
            if de.is_symlink():
                if not follow:
                    return Node(de.name, "skip", ref="symlink not followed")
                try:
                    st = os.stat(de.path)
                except OSError as e:
                    return Node(de.name, "skip", ref=f"broken symlink ({e.strerror})")
                if stat.S_ISDIR(st.st_mode):
                    return Node(de.name, "dir", (st.st_dev, st.st_ino))
                if stat.S_ISREG(st.st_mode):
                    return Node(de.name, "file", ref=st)
            elif de.is_dir(follow_symlinks=False):
                ino: Hashable | None = None
                if follow:  # identities only matter when links can lead back up
                    st = de.stat(follow_symlinks=False)
                    ino = (st.st_dev, st.st_ino)
                return Node(de.name, "dir", ino)
            elif de.is_file(follow_symlinks=False):
                return Node(de.name, "file", ref=de)
            # sockets, fifos and devices are not data to copy
        except OSError as e:
            self._list_error(f"{de.path}: {e.strerror or e}")
        return None

    def _entry(self, key: str, node: Node) -> Entry | None:
        ref = node.ref
        if isinstance(ref, os.stat_result):  # a followed symlink, stat()ed when scanned
            st = ref
        elif isinstance(ref, tuple):  # `_plain` of a stat result: from a directory sorted on disk
            return fields_entry(key, cast(FileFields, ref))
        else:
            # a DirEntry's stat is one lstat, made now; a directory sorted on disk carries None
            # in its place and costs the same one lstat here
            try:
                st = ref.stat(follow_symlinks=False) if ref is not None else os.lstat(os.path.join(self.root, key))
            except FileNotFoundError:
                return None
            except OSError as e:
                self._list_error(f"{os.path.join(self.root, key)}: {e.strerror or e}")
                return None
        return Entry(key, st.st_size, st.st_mtime, mode=stat.S_IMODE(st.st_mode))

    # ---- single objects ---------------------------------------------------------------------
    def check_name(self, key: str) -> None:
        check_key(key)  # any bytes make a name here: only the path rules apply

    def head(self, key: str) -> Entry:
        path = os.path.join(self.root, check_relative(key))
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound(f"{path} does not exist") from None
            raise _os_error(e, path, "stat") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"{path} is not a regular file")
        return Entry(key, st.st_size, st.st_mtime, mode=stat.S_IMODE(st.st_mode))

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        path = os.path.join(self.root, check_relative(key))
        try:
            f = io.FileIO(path, "r")
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                raise NotFound(f"{path} does not exist or is not a file") from None
            raise _os_error(e, path, "open") from None
        if start:
            f.seek(start)
        return cast(BinaryIO, _RangeReader(f, start, end))

    def put(
        self, key: str, data: BinaryIO, size: int, *, mtime: float | None = None, mode: int | None = None,
        content_md5: str | None = None,
    ) -> Entry:
        path = self.local_path(check_key(key))
        tmp, fd = self._create_temp(key, path)
        try:
            src_fd = _kernel_copy_source(data)
            if src_fd is not None:
                _copy_fd(src_fd, fd, size, key)
            else:
                read_exact(data, size, _writer(fd), key)
        except BaseException as e:
            os.close(fd)
            _unlink_quietly(tmp)
            if isinstance(e, OSError):
                raise _os_error(e, path, "copy to") from None
            raise
        try:
            return self._finish(fd, tmp, path, key, mtime, mode)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise StorageError(f"cannot delete {path}: it is a directory", code="PathConflict") from None
        except OSError as e:
            raise _os_error(e, path, "delete") from None
        # a removed file may leave empty directories behind; remove them up to the root
        parent = os.path.dirname(path)
        while parent != self.root and parent.startswith(self.root + "/"):
            try:
                os.rmdir(parent)
            except OSError:
                break
            self._dirs.discard(parent)
            self._plain.clear()
            parent = os.path.dirname(parent)

    def open_writer(self, key: str, size: int) -> Writer:
        path = self.local_path(check_key(key))
        tmp, fd = self._create_temp(key, path, os.O_RDWR)  # read back: the engine hashes what it wrote
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            _unlink_quietly(tmp)
            raise _os_error(e, tmp, "allocate") from None
        return _LocalWriter(self, key, path, tmp, fd, size)


class _RangeReader(io.RawIOBase):
    """Bytes [start, end) of an open file; EOF at `end`."""

    def __init__(self, f: io.FileIO, start: int, end: int | None) -> None:
        super().__init__()
        self._f = f
        self._whole = start == 0 and end is None
        self._left = None if end is None else max(0, end - start)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        # only a whole-file reader may be handed to the kernel: a range would need offsets the
        # consumer does not know about
        if not self._whole:
            raise io.UnsupportedOperation("fileno() of a ranged reader")
        return self._f.fileno()

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self._left if self._left is not None else -1
            if n < 0:
                return self._f.readall()
        if self._left is not None:
            n = min(n, self._left)
        if n == 0:
            return b""
        data = self._f.read(n) or b""
        if self._left is not None:
            self._left -= len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(memoryview(b)))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class _LocalWriter(Writer):
    """A temp file written with pwrite from many threads; renamed into place on commit.

    commit/abort wait for writes in flight before closing the fd: a range still being written
    when another range failed (and the engine aborted) must never pwrite to a closed fd number,
    which another thread may meanwhile have been given for another file."""

    reads_back = True

    def __init__(self, storage: LocalStorage, key: str, path: str, tmp: str, fd: int, size: int) -> None:
        self._storage, self._key, self._path, self._tmp = storage, key, path, tmp
        self._fd: int | None = fd
        self._size = size
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._writing = 0  # write_at calls using the fd right now
        self._committed = False

    def write_at(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self._size:
            raise StorageError(
                f"{self._key}: write of {len(data)} bytes at {offset} exceeds the size {self._size}",
                code="InvalidRange",
            )
        with self._lock:
            fd = self._fd
            if fd is None:
                raise StorageError(f"{self._key}: write after commit or abort", code="InvalidState")
            self._writing += 1
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view, offset = view[n:], offset + n
        except OSError as e:
            raise _os_error(e, self._tmp, "write") from None
        finally:
            with self._lock:
                self._writing -= 1
                if not self._writing:
                    self._idle.notify_all()

    def read_at(self, offset: int, n: int) -> bytes:
        with self._lock:
            fd = self._fd
            if fd is None:
                raise StorageError(f"{self._key}: read after commit or abort", code="InvalidState")
            self._writing += 1  # the fd stays open until this read is done, as for a write
        try:
            return os.pread(fd, n, offset)
        except OSError as e:
            raise _os_error(e, self._tmp, "read") from None
        finally:
            with self._lock:
                self._writing -= 1
                if not self._writing:
                    self._idle.notify_all()

    def _take_fd(self) -> int | None:
        """The fd, once no write uses it; from now on writes are refused. Call with the lock."""
        fd, self._fd = self._fd, None
        while self._writing:
            self._idle.wait()
        return fd

    def commit(self, mtime: float | None = None, mode: int | None = None) -> None:
        with self._lock:
            fd = self._take_fd()
            if fd is None:
                raise StorageError(f"{self._key}: commit after commit or abort", code="InvalidState")
            try:
                self._storage._finish(fd, self._tmp, self._path, self._key, mtime, mode)
            except BaseException:
                _unlink_quietly(self._tmp)
                raise
            self._committed = True

    def abort(self) -> None:
        with self._lock:
            fd = self._take_fd()
            if fd is not None:
                os.close(fd)
            if not self._committed:
                _unlink_quietly(self._tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _writer(fd: int) -> Callable[[bytes], None]:
    """write(data) that writes all of `data` to `fd` or raises. A write to a nearly full disk
    writes what fits and returns that count (the ENOSPC comes only with the next write), so a
    single unchecked write() silently drops the rest of the chunk."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]

    return write


def _kernel_copy_source(data: BinaryIO) -> int | None:
    """The fd of `data` when the kernel can copy from it: a regular file whose fd offset is where
    the Python object says it is (nothing buffered ahead)."""
    try:
        fd = data.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if data.tell() != os.lseek(fd, 0, os.SEEK_CUR):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return fd


def _copy_fd(src: int, dst: int, size: int, key: str) -> None:
    """Copy `size` bytes between fds, zero-copy where the kernel allows, then check for extras.
    All three methods move the fds' own offsets, so falling back mid-way continues correctly."""
    remaining = size
    method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    while remaining > 0:
        n = min(remaining, 64 * CHUNK)
        try:
            if method == "copy_file_range":
                done = os.copy_file_range(src, dst, n)
            elif method == "sendfile":
                done = os.sendfile(dst, src, None, n)
            else:
                buf = os.read(src, min(n, CHUNK))
                done = len(buf)
                view = memoryview(buf)
                while view:
                    view = view[os.write(dst, view):]
        except OSError as e:
            if method != "read" and e.errno in (
                errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF
            ):
                method = "sendfile" if method == "copy_file_range" else "read"
                continue
            raise
        if done == 0:
            if method != "read":  # some file systems report 0 from the kernel calls early: ask read()
                method = "read"
                continue
            raise size_mismatch(key, size, size - remaining)
        remaining -= done
    if os.read(src, 1):
        raise size_mismatch(key, size, None)
