"""Writes through the mount: bytes go to a local spool file, then to the store on close/fsync.

An object cannot be changed in place, so a file opened for writing is a new object being built:
its bytes collect in a spool file under the cache directory (any write order works there), and
`flush` (every close, once something was written), `fsync` and the last `release` upload it through the engine's transfer,
the same code path as `ossimport cp` (multipart when large, size and MD5/CRC64 verified). Only
then is the new content visible in the store, all at once. An upload that fails is reported to
the writer's close() or fsync() as EIO.

Spool files are named `spool-N`; the directory belongs to one mount and is emptied when the
mount starts (what a killed mount left was never acknowledged to its writer).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading

from ossimport.address import Location
from ossimport.engine.stats import Stats
from ossimport.engine.transfer import Transfer, TransferOptions
from ossimport.storage.base import Entry, Storage
from ossimport.storage.local import LocalStorage

log = logging.getLogger("ossimport")

MiB = 1024 * 1024


class SpoolFile:
    """One file being written. Shared by every handle open on its key (`refs` counts them)."""

    def __init__(self, key: str, path: str, fd: int) -> None:
        self.key = key
        self.path = path
        self.name = os.path.basename(path)
        self.fd = fd
        self.dirty = False  # holds bytes the store does not have yet
        # written to through a handle since the last upload. A flush without it is a close of a
        # descriptor before any write (a shell's `>` opens, dup2()s and closes the first one):
        # uploading there would publish an empty object before the real bytes
        self.written = False
        self.unlinked = False  # removed while open: never uploaded
        self.refs = 1
        self.lock = threading.Lock()  # one write, truncate or upload at a time

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def mtime(self) -> float:
        return os.fstat(self.fd).st_mtime

    def write(self, data: bytes, offset: int) -> int:
        with self.lock:
            n = os.pwrite(self.fd, data, offset)
            self.dirty = self.written = True
        return n

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def truncate(self, length: int) -> None:
        with self.lock:
            os.ftruncate(self.fd, length)
            self.dirty = self.written = True

    def set_mtime(self, mtime_ns: int) -> None:
        """The mtime the object gets (stores that keep one, see Abilities.set_mtime)."""
        with self.lock:
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            self.dirty = True


class Spool:
    """The spool directory of one mount and the transfer that uploads from it."""

    def __init__(self, storage: Storage, directory: str, opts: TransferOptions | None = None) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith("spool-"):
                os.unlink(os.path.join(directory, name))
        self._local = LocalStorage(Location(backend="local", flavour="local", path=directory))
        self.transfer = Transfer(self._local, storage, opts or TransferOptions(
            multipart_threshold=16 * MiB, part_size=16 * MiB, part_threads=8, keep_perms=False), Stats())
        self._seq = itertools.count(1)

    def new(self, key: str) -> SpoolFile:
        path = os.path.join(self.directory, f"spool-{next(self._seq)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return SpoolFile(key, path, fd)

    def upload(self, sf: SpoolFile) -> Entry:
        """Send the spool file's bytes to `sf.key`, verified; the file stays (it may be written on)."""
        with sf.lock:
            st = os.fstat(sf.fd)
            result = self.transfer.copy(Entry(sf.name, st.st_size, st.st_mtime), sf.key)
            sf.dirty = sf.written = False
        log.info("uploaded %s (%d bytes)", sf.key, st.st_size)
        return result

    def discard(self, sf: SpoolFile) -> None:
        os.close(sf.fd)
        try:
            os.unlink(sf.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.transfer.close()
        self._local.close()
