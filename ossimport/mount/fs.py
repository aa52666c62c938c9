"""The FUSE operations of a mounted store (mfusepy, libfuse 3 high-level API, one thread per
request).

What an object store cannot do fails at once with the errno a program expects:
  hard links, symbolic links, device nodes    EPERM
  chmod / chown to other values than shown    EPERM (setting what is shown is a no-op)
  writing into an existing object without     EOPNOTSUPP (append, in-place edits: the object
  O_TRUNC, truncating it to another size       would have to be rewritten whole)
  renaming a directory                        EXDEV (mv then copies and deletes file by file)
  any change on a --read-only mount           EROFS
Setting times of an object not open for writing is accepted and ignored (its mtime is the
store's); on a file being written it becomes the uploaded object's mtime where the store keeps
one.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mfusepy

from ossimport.engine.stats import Stats
from ossimport.engine.transfer import Transfer, TransferOptions
from ossimport.errors import NotFound, StorageError
from ossimport.log import redact
from ossimport.mount.meta import DIR, Attr, Namespace, key_of, split
from ossimport.mount.readahead import MemoryBudget, Reader
from ossimport.mount.spool import Spool, SpoolFile
from ossimport.storage.base import Entry, Storage

log = logging.getLogger("ossimport")

MiB = 1024 * 1024
# libfuse passes utimensat's special nanosecond values through
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_MAX_OPENED = 100_000  # objects whose identity at the last open is remembered (for keep_cache)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthenticationFailed"}


@dataclass
class MountOptions:
    read_only: bool = False
    attr_ttl: float = 1.0
    dir_ttl: float = 10.0
    read_ahead: int = 64 * MiB  # largest read-ahead window of one file
    read_memory: int = 256 * MiB  # read-ahead bytes held by all open files together
    read_threads: int = 16  # ranged GETs in flight across all files
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


def _errno_of(exc: StorageError) -> int:
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if exc.code in _DENIED:
        return errno.EACCES
    return errno.EIO


def _fail(err: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(err)


@dataclass
class _DirHandle:
    key: str
    entries: Iterator[tuple[str, Attr]]
    seen: list[tuple[str, Attr]] = field(default_factory=list)
    done: bool = False


class MountFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, storage: Storage, spool_dir: str, opts: MountOptions,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.storage = storage
        self.opts = opts
        self.ns = Namespace(storage, opts.attr_ttl, opts.dir_ttl)
        self.spool = Spool(storage, spool_dir)
        self.budget = MemoryBudget(opts.read_memory)
        self.pool = ThreadPoolExecutor(opts.read_threads, thread_name_prefix="read-ahead")
        # rename: server-side copy where the store has it, verified like every copy
        self.copier = Transfer(storage, storage, TransferOptions(keep_perms=False), Stats())
        self._on_ready = on_ready
        self._started = time.time()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._files: dict[int, Reader | SpoolFile] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._writers: dict[str, SpoolFile] = {}  # key -> the spool file open for writing it
        # key -> (size, mtime, etag) when last opened for reading, oldest first
        self._opened: dict[str, tuple[int, float, str | None]] = {}

    # ---- life cycle ------------------------------------------------------------------------------
    def init_with_config(self, conn_info: Any, config: Any) -> None:
        if config is not None:
            config.entry_timeout = config.attr_timeout = config.negative_timeout = self.opts.attr_ttl
            config.hard_remove = 1  # unlink of an open file deletes the object (no .fuse_hidden copies)
        if self._on_ready:
            self._on_ready()

    def destroy(self, path: str) -> None:
        """Unmount (umount, SIGTERM): upload what open files still hold, then stop."""
        with self._lock:
            pending = [sf for sf in self._writers.values() if sf.dirty and not sf.unlinked]
        for sf in pending:
            try:
                self._upload(sf)
            except (StorageError, OSError) as exc:
                log.error("could not upload %s at unmount: %s", sf.key, redact(str(exc)))
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.spool.close()
        self.copier.close()

    # ---- attributes ------------------------------------------------------------------------------
    def _stat(self, attr: Attr) -> dict[str, Any]:
        ro = self.opts.read_only
        if attr.is_dir:
            mode = stat.S_IFDIR | (0o555 if ro else 0o755)
        else:
            mode = stat.S_IFREG | (0o444 if ro else 0o644)
        ns = int((attr.mtime or self._started) * 1e9)  # a directory's: when the mount started
        return {"st_mode": mode, "st_nlink": 2 if attr.is_dir else 1, "st_size": attr.size,
                "st_blocks": (attr.size + 511) // 512, "st_uid": self.opts.uid, "st_gid": self.opts.gid,
                # the I/O size tools such as cp use: 1 MiB writes are 8x fewer requests to us
                "st_blksize": MiB,
                "st_mtime": ns, "st_ctime": ns, "st_atime": ns}

    def _file_attr(self, key: str) -> Attr:
        """The attributes of the file `key`: ENOENT when there is none, EISDIR for a directory."""
        attr = self._attr(key)
        if attr is None:
            raise _fail(errno.ENOENT)
        if attr.is_dir:
            raise _fail(errno.EISDIR)
        return attr

    def _attr(self, key: str) -> Attr | None:
        with self._lock:
            sf = self._writers.get(key)
        if sf is not None and not sf.unlinked:
            return Attr(False, sf.size(), sf.mtime())
        try:
            return self.ns.attr(key)
        except StorageError as exc:
            raise self._storage_failed("stat", key, exc) from None

    def _storage_failed(self, op: str, key: str, exc: StorageError) -> mfusepy.FuseOSError:
        err = _errno_of(exc)
        if err != errno.ENOENT:
            log.error("%s %s: %s", op, key or "/", redact(str(exc)))
        return _fail(err)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        attr = self._attr(key_of(path))
        if attr is None:
            raise _fail(errno.ENOENT)
        return self._stat(attr)

    def statfs(self, path: str) -> dict[str, int]:
        big = 1 << 40  # an object store has no fixed size: report plenty so tools do not refuse
        return {"f_bsize": MiB, "f_frsize": 4096, "f_blocks": big, "f_bfree": big, "f_bavail": big,
                "f_files": big, "f_ffree": big, "f_namemax": 1024}

    # ---- directories ---------------------------------------------------------------------------
    def opendir(self, path: str) -> int:
        key = key_of(path)
        attr = self._attr(key)
        if attr is None:
            raise _fail(errno.ENOENT)
        if not attr.is_dir:
            raise _fail(errno.ENOTDIR)
        handle = _DirHandle(key, self.ns.listdir(key))
        with self._lock:
            fh = next(self._ids)
            self._dirs[fh] = handle
        return fh

    def readdir_with_offset(self, path: str, offset: int, fh: int) -> Iterator[tuple[str, Any, int]]:
        handle = self._dirs[fh]
        dot = {"st_mode": stat.S_IFDIR}
        if offset < 1:
            yield ".", dot, 1
        if offset < 2:
            yield "..", dot, 2
        i = max(0, offset - 2)
        while True:
            while i < len(handle.seen):
                name, attr = handle.seen[i]
                i += 1
                yield name, {"st_mode": stat.S_IFDIR if attr.is_dir else stat.S_IFREG}, i + 2
            if handle.done:
                return
            try:
                item = next(handle.entries, None)
            except StorageError as exc:
                raise self._storage_failed("list", handle.key, exc) from None
            if item is None:
                handle.done = True
                handle.seen += self._files_being_written(handle.key, {name for name, _ in handle.seen})
            else:
                handle.seen.append(item)

    def _files_being_written(self, dir_key: str, listed: set[str]) -> list[tuple[str, Attr]]:
        """New files still open for writing: not in the store yet, but there for whoever lists."""
        with self._lock:
            writers = [sf for k, sf in self._writers.items() if split(k)[0] == dir_key and not sf.unlinked]
        return [(split(sf.key)[1], Attr(False, sf.size(), sf.mtime())) for sf in writers
                if split(sf.key)[1] not in listed]

    def releasedir(self, path: str, fh: int) -> int:
        with self._lock:
            handle = self._dirs.pop(fh, None)
        if handle is not None and not handle.done:
            close = getattr(handle.entries, "close", None)
            if close:
                close()
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        key = self._writable_key(path)
        if self._attr(key) is not None:
            raise _fail(errno.EEXIST)
        self._parent_dir(key)
        try:
            self.storage.put(key + "/", io.BytesIO(b""), 0)  # a marker: the directory exists while empty
        except StorageError as exc:
            raise self._storage_failed("mkdir", key, exc) from None
        self.ns.added(key, DIR)
        return 0

    def rmdir(self, path: str) -> int:
        key = self._writable_key(path)
        attr = self._attr(key)
        if attr is None:
            # the kernel knew it a moment ago: a directory that existed only through its keys
            # went away with the last of them (rm -r), which is what rmdir wants
            return 0
        if not attr.is_dir:
            raise _fail(errno.ENOTDIR)
        with self._lock:
            if any(k.startswith(key + "/") for k in self._writers):
                raise _fail(errno.ENOTEMPTY)
        try:
            if self.ns.has_children(key):
                raise _fail(errno.ENOTEMPTY)
            self.storage.delete(key + "/")
        except StorageError as exc:
            raise self._storage_failed("rmdir", key, exc) from None
        self.ns.removed(key)
        return 0

    # ---- reading --------------------------------------------------------------------------------
    def open(self, path: str, fi: Any) -> int:
        key = key_of(path)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY:
            fi.fh = self._open_for_writing(key, fi.flags)
            return 0
        with self._lock:
            sf = self._writers.get(key)
            if sf is not None and not sf.unlinked:
                sf.refs += 1  # being written: read what is written so far
                fi.fh = self._register(sf)
                return 0
        attr = self._file_attr(key)
        reader = Reader(self.storage, key, attr.size, self.pool, self.budget,
                        max_window=self.opts.read_ahead)
        ident = (attr.size, attr.mtime, attr.etag)
        with self._lock:
            fi.fh = self._register(reader)
            # the same object as at the last open: the kernel may keep the pages it read then
            # (a second epoch over a data set costs no requests)
            fi.keep_cache = int(self._opened.pop(key, None) == ident)
            self._opened[key] = ident
            if len(self._opened) > _MAX_OPENED:
                del self._opened[next(iter(self._opened))]
        return 0

    def _register(self, handle: Reader | SpoolFile) -> int:
        fh = next(self._ids)
        self._files[fh] = handle
        return fh

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        handle = self._files[fi.fh]
        if isinstance(handle, SpoolFile):
            return handle.read(size, offset)
        try:
            return handle.read(offset, size)
        except StorageError as exc:
            raise self._storage_failed("read", handle.key, exc) from None

    def release(self, path: str, fi: Any) -> int:
        with self._lock:
            handle = self._files.pop(fi.fh, None)
        if isinstance(handle, Reader):
            handle.close()
        elif isinstance(handle, SpoolFile):
            self._release_spool(handle)
        return 0

    # ---- writing --------------------------------------------------------------------------------
    def _writable_key(self, path: str) -> str:
        if self.opts.read_only:
            raise _fail(errno.EROFS)
        return key_of(path)

    def _parent_dir(self, key: str) -> None:
        parent = self._attr(split(key)[0])
        if parent is None:
            raise _fail(errno.ENOENT)
        if not parent.is_dir:
            raise _fail(errno.ENOTDIR)

    def create(self, path: str, mode: int, fi: Any) -> int:
        key = self._writable_key(path)
        self._parent_dir(key)
        sf = self.spool.new(key)
        sf.dirty = True  # even an empty new file becomes an object
        with self._lock:
            old = self._writers.get(key)
            if old is not None:
                old.unlinked = True  # replaced before it was closed: its bytes are not wanted
            self._writers[key] = sf
            fi.fh = self._register(sf)
        return 0

    def _open_for_writing(self, key: str, flags: int) -> int:
        if self.opts.read_only:
            raise _fail(errno.EROFS)
        truncate = bool(flags & os.O_TRUNC)
        with self._lock:
            sf = self._writers.get(key)
            if sf is not None and not sf.unlinked:
                sf.refs += 1
                fh = self._register(sf)
            else:
                sf = None
        if sf is not None:
            if truncate:
                sf.truncate(0)
            return fh
        attr = self._file_attr(key)
        if not truncate and attr.size:
            log.info("refused to open %s for writing without O_TRUNC (objects are rewritten whole)", key)
            raise _fail(errno.EOPNOTSUPP)
        sf = self.spool.new(key)
        sf.dirty = truncate
        with self._lock:
            self._writers[key] = sf
            return self._register(sf)

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        handle = self._files[fi.fh]
        if not isinstance(handle, SpoolFile):
            raise _fail(errno.EBADF)
        return handle.write(data, offset)

    def truncate(self, path: str, length: int, fi: Any = None) -> int:
        key = self._writable_key(path)
        handle = self._files.get(fi.fh) if fi is not None else None
        if not isinstance(handle, SpoolFile):
            with self._lock:
                handle = self._writers.get(key)
        if handle is not None and not handle.unlinked:
            handle.truncate(length)
            return 0
        attr = self._file_attr(key)
        if length == attr.size:
            return 0
        if length:
            raise _fail(errno.EOPNOTSUPP)
        sf = self.spool.new(key)  # truncate to 0: the object becomes empty
        try:
            self._upload(sf)
        finally:
            self.spool.discard(sf)
        return 0

    def flush(self, path: str, fi: Any) -> int:
        handle = self._files.get(fi.fh)
        if isinstance(handle, SpoolFile) and handle.dirty and handle.written and not handle.unlinked:
            self._upload(handle)
        return 0

    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        handle = self._files.get(fi.fh)
        if isinstance(handle, SpoolFile) and handle.dirty and not handle.unlinked:
            self._upload(handle)
        return 0

    def _upload(self, sf: SpoolFile) -> None:
        try:
            result = self.spool.upload(sf)
        except StorageError as exc:
            raise self._storage_failed("upload", sf.key, exc) from None
        self.ns.added(sf.key, Attr(False, result.size, result.mtime, result.etag))

    def _release_spool(self, sf: SpoolFile) -> None:
        with self._lock:
            sf.refs -= 1
            last = sf.refs == 0
            if last and self._writers.get(sf.key) is sf:
                del self._writers[sf.key]
        if not last:
            return
        try:
            if sf.dirty and not sf.unlinked:
                self._upload(sf)  # flush runs before release; this is for a failed or missing one
        except mfusepy.FuseOSError:
            log.error("%s: the last upload failed; its bytes are lost", sf.key)
        finally:
            self.spool.discard(sf)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        key = key_of(path)
        with self._lock:
            sf = self._writers.get(key)
        if sf is not None and not sf.unlinked:
            mtime = times[1] if times else time.time_ns()
            nsec = mtime % 1_000_000_000
            if nsec == _UTIME_NOW:
                mtime = time.time_ns()
            if nsec != _UTIME_OMIT:
                sf.set_mtime(mtime)
            return 0
        if self._attr(key) is None:
            raise _fail(errno.ENOENT)
        return 0  # an object's mtime is the store's: accepted and ignored

    def unlink(self, path: str) -> int:
        key = self._writable_key(path)
        self._file_attr(key)  # only files are unlinked
        with self._lock:
            sf = self._writers.pop(key, None)
            if sf is not None:
                sf.unlinked = True
        try:
            self.storage.delete(key)
        except StorageError as exc:
            raise self._storage_failed("delete", key, exc) from None
        self.ns.removed(key)
        return 0

    def rename(self, old: str, new: str) -> int:
        src, dst = self._writable_key(old), key_of(new)
        if src == dst:
            return 0  # copy + delete of a key onto itself would delete it
        attr = self._attr(src)
        if attr is None:
            raise _fail(errno.ENOENT)
        if attr.is_dir:
            raise _fail(errno.EXDEV)  # no directory rename on a store: mv falls back to copying
        target = self._attr(dst)
        if target is not None and target.is_dir:
            raise _fail(errno.EISDIR)
        self._parent_dir(dst)
        with self._lock:
            sf = self._writers.get(src)
        if sf is not None and sf.dirty:
            self._upload(sf)  # the object must exist before it can be copied
        attr = self.ns.attr(src) or attr
        try:
            result = self.copier.copy(Entry(src, attr.size, attr.mtime, attr.etag), dst)
            self.storage.delete(src)  # after the copy: a crash between the two loses nothing
        except StorageError as exc:
            self.ns.forget(dst)
            raise self._storage_failed("rename", src, exc) from None
        with self._lock:
            if sf is not None and self._writers.get(src) is sf:
                del self._writers[src]
                sf.key = dst  # later writes through open handles go to the new name
                self._writers[dst] = sf
        self.ns.removed(src)
        self.ns.added(dst, Attr(False, result.size, result.mtime, result.etag))
        return 0

    # ---- what an object store cannot do ------------------------------------------------------------
    def chmod(self, path: str, mode: int) -> int:
        attr = self._attr(key_of(path))
        if attr is None:
            raise _fail(errno.ENOENT)
        if stat.S_IMODE(mode) != stat.S_IMODE(self._stat(attr)["st_mode"]):
            raise _fail(errno.EPERM)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        if self._attr(key_of(path)) is None:
            raise _fail(errno.ENOENT)
        if uid not in (-1, 0xFFFFFFFF, self.opts.uid) or gid not in (-1, 0xFFFFFFFF, self.opts.gid):
            raise _fail(errno.EPERM)
        return 0

    def link(self, target: str, source: str) -> int:
        raise _fail(errno.EROFS if self.opts.read_only else errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise _fail(errno.EROFS if self.opts.read_only else errno.EPERM)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise _fail(errno.EROFS if self.opts.read_only else errno.EPERM)

    def readlink(self, path: str) -> str:
        raise _fail(errno.EINVAL)


class FUSE(mfusepy.FUSE):
    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        # RENAME_NOREPLACE / RENAME_EXCHANGE cannot be done atomically on a store: refuse them
        # (mv falls back to a plain rename) instead of silently doing something else
        if flags:
            return -errno.EINVAL
        return super().rename_fuse_3(old, new, flags)
