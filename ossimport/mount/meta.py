"""Names and attributes of a mounted store: what `getattr`, `lookup` and `readdir` answer.

An object store has keys, not directories. A directory is a key prefix ending in '/': it exists
while some key lies under it, or a zero-byte `dir/` marker names it (what `mkdir` writes here and
what consoles write). Sizes and mtimes come from listings and HEADs.

Two caches keep the store from being asked again and again (both invalidated by our own writes):
  attributes        one path's answer (including "does not exist"), for `attr_ttl` seconds
                    (`dir_ttl` for a directory: it has no size or mtime to go stale)
  directory lists   one directory's names and attributes, for `dir_ttl` seconds; while a
                    directory's list is fresh, lookups of names in it are answered from it
Both are bounded (MAX_ATTRS answers, MAX_LISTED names), so memory does not grow with the tree.
A key that is both an object and a directory prefix shows as the directory in listings (a
lookup without a fresh listing finds the object: one HEAD, not a HEAD and a LIST per file).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ossimport.errors import NotFound
from ossimport.storage.base import Storage

log = logging.getLogger("ossimport")

# what the caches may hold (about 100 MB together): answers for single paths, and names in cached
# directory listings over all directories (the oldest listing goes first)
MAX_ATTRS = 200_000
MAX_LISTED = 500_000


@dataclass(frozen=True, slots=True)
class Attr:
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str | None = None


DIR = Attr(is_dir=True)


def key_of(path: str) -> str:
    """FUSE path '/a/b' -> storage key 'a/b'; the root '/' -> ''."""
    return path.strip("/")


def dir_prefix(key: str) -> str:
    return key + "/" if key else ""


def split(key: str) -> tuple[str, str]:
    """'a/b/c' -> ('a/b', 'c'); 'c' -> ('', 'c')."""
    parent, _, name = key.rpartition("/")
    return parent, name


def usable_name(name: str) -> bool:
    """Keys such as 'a//b' or 'a/./b' have segments no file system can show."""
    return name not in ("", ".", "..")


class Namespace:
    """The cached view of the store's names. Thread-safe; store requests run outside the lock."""

    def __init__(self, storage: Storage, attr_ttl: float, dir_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.attr_ttl = attr_ttl
        self.dir_ttl = dir_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._attrs: dict[str, tuple[float, Attr | None]] = {}  # key -> (expires, attr; None = missing)
        self._dirs: dict[str, tuple[float, dict[str, Attr]]] = {}  # dir key -> (expires, name -> attr)

    # ---- questions -----------------------------------------------------------------------------
    def attr(self, key: str) -> Attr | None:
        """The attributes of `key`, None when nothing is there."""
        if not key:
            return DIR
        now = self._clock()
        parent, name = split(key)
        with self._lock:
            hit = self._attrs.get(key)
            if hit and hit[0] > now:
                return hit[1]
            listed = self._dirs.get(parent)
            if listed and listed[0] > now:
                return listed[1].get(name)
        found = self._resolve(key)
        # a directory has no size or mtime to go stale: it is kept as long as listings are
        ttl = self.dir_ttl if found is not None and found.is_dir else self.attr_ttl
        with self._lock:
            self._attrs[key] = (self._clock() + ttl, found)
            if len(self._attrs) > MAX_ATTRS:
                self._trim_attrs()
        return found

    def _trim_attrs(self) -> None:
        """Under the lock: drop expired answers, then the oldest, down to 90% of the cap."""
        now = self._clock()
        for k in [k for k, (expires, _) in self._attrs.items() if expires <= now]:
            del self._attrs[k]
        while len(self._attrs) > MAX_ATTRS * 9 // 10:
            del self._attrs[next(iter(self._attrs))]

    def _resolve(self, key: str) -> Attr | None:
        """Ask the store: an object named `key`, else a directory (keys under it, or a marker)."""
        log.debug("looking up %s in the store", key)
        try:
            e = self.storage.head(key)
        except NotFound:
            pass
        else:
            return Attr(False, e.size, e.mtime, e.etag)
        if self.has_children(key):
            return DIR
        try:
            self.storage.head(key + "/")
        except NotFound:
            return None
        return DIR

    def has_children(self, key: str) -> bool:
        """Whether a file or directory lies under `key` (markers do not count). One small LIST."""
        return any(True for _ in self.storage.list_level(key + "/", limit=1))

    def listdir(self, key: str) -> Iterator[tuple[str, Attr]]:
        """The names in directory `key` with their attributes, streaming page by page from the
        store unless a fresh list is cached. A complete walk is cached for `dir_ttl`."""
        now = self._clock()
        with self._lock:
            listed = self._dirs.get(key)
        if listed and listed[0] > now:
            yield from list(listed[1].items())
            return
        prefix = dir_prefix(key)
        names: dict[str, Attr] = {}
        for e in self.storage.list_level(prefix):
            rest = e.key[len(prefix):]
            is_dir = rest.endswith("/")
            name = rest[:-1] if is_dir else rest
            if not usable_name(name) or "/" in name:
                continue
            if name in names:
                # object and prefix with one name: the directory wins (already shown if it came first)
                if is_dir and not names[name].is_dir:
                    names[name] = DIR
                continue
            attr = DIR if is_dir else Attr(False, e.size, e.mtime, e.etag)
            names[name] = attr
            yield name, attr
        if len(names) > MAX_LISTED // 2:
            return  # a giant directory streams every time rather than taking the cache alone
        expires = self._clock() + self.dir_ttl
        with self._lock:
            self._dirs.pop(key, None)
            self._dirs[key] = (expires, names)  # (re)inserted last: the newest
            total = sum(len(n) for _, n in self._dirs.values())
            while total > MAX_LISTED:
                total -= len(self._dirs.pop(next(iter(self._dirs)))[1])

    # ---- our own changes ---------------------------------------------------------------------
    def added(self, key: str, attr: Attr) -> None:
        """`key` now exists (we wrote it): every cached list on its way shows it."""
        expires = self._clock() + self.attr_ttl
        with self._lock:
            self._attrs[key] = (expires, attr)
            child, child_attr = key, attr
            while child:
                parent, name = split(child)
                listed = self._dirs.get(parent)
                if listed:
                    listed[1][name] = child_attr
                if parent:
                    self._attrs[parent] = (expires, DIR)
                child, child_attr = parent, DIR

    def removed(self, key: str) -> None:
        """`key` is gone (we deleted it). Its parent may be gone too (a directory that only
        existed through it): the parent's attributes are asked again."""
        with self._lock:
            self._attrs[key] = (self._clock() + self.attr_ttl, None)
            self._dirs.pop(key, None)
            parent, name = split(key)
            listed = self._dirs.get(parent)
            if listed:
                listed[1].pop(name, None)
            if parent:
                self._attrs.pop(parent, None)
                self._dirs.pop(split(parent)[0], None)  # may or may not still list `parent`

    def forget(self, key: str) -> None:
        """Drop what is cached about `key` (after a failed change whose outcome is unknown)."""
        with self._lock:
            self._attrs.pop(key, None)
            self._dirs.pop(split(key)[0], None)
