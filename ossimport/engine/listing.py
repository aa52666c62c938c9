"""Listings as sorted streams: filters, key ranges, and the merge of source and destination.

Both sides are walked in ascending byte order and merged pairwise, so memory does not grow with
the number of objects and copying starts while listing continues."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from re import _constants as _sre  # type: ignore[attr-defined]
from re import _parser as _sre_parser  # type: ignore[attr-defined]

from ossimport.errors import StorageError, UsageError
from ossimport.storage.base import Entry


def _compile(patterns: Iterable[str], option: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"{option} {p!r} is not a valid regular expression: {exc}") from None
    return out


def _plain_text(pattern: re.Pattern[str]) -> tuple[str | None, bool]:
    """(the text, anchored at the start) of a pattern made of literal characters only, optionally
    after '^'; (None, False) for any other pattern."""
    ops = list(_sre_parser.parse(pattern.pattern, pattern.flags))
    anchored = bool(ops) and ops[0] in ((_sre.AT, _sre.AT_BEGINNING), (_sre.AT, _sre.AT_BEGINNING_STRING))
    if anchored:
        ops = ops[1:]
    if pattern.flags & re.IGNORECASE or any(op is not _sre.LITERAL for op, _ in ops):
        return None, False
    return "".join(chr(c) for _, c in ops), anchored


@dataclass
class Filter:
    """ads-cli filter rules; patterns are regular expressions searched anywhere in the key
    relative to the source root (`base` contains, `^base` starts with, `^base$` is exactly,
    `1$` ends with).

    - A key matching any --exclude is dropped, unless it also matches an --include.
    - --include without any --exclude selects: only keys matching an --include are kept.
    - --exclude-dir / --include-dir apply the same rules to each directory name on the key's
      path (a key is dropped when one of its directories is excluded and not re-included).
    """

    exclude: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude_dir: list[str] = field(default_factory=list)
    include_dir: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ex = _compile(self.exclude, "--exclude")
        self._in = _compile(self.include, "--include")
        self._exd = _compile(self.exclude_dir, "--exclude-dir")
        self._ind = _compile(self.include_dir, "--include-dir")

    @property
    def active(self) -> bool:
        return bool(self._ex or self._in or self._exd or self._ind)

    @staticmethod
    def _decide(text: str, exclude: list[re.Pattern[str]], include: list[re.Pattern[str]]) -> bool:
        if exclude:
            if any(p.search(text) for p in exclude):
                return any(p.search(text) for p in include)
            return True
        if include:
            return any(p.search(text) for p in include)
        return True

    def keeps_out(self, dir_key: str) -> bool:
        """Whether the rules provably drop every key under the directory `dir_key` ("a/b/"): an
        --exclude-dir matches one of its names and no --include-dir re-admits it, or an --exclude
        is plain text (optionally anchored with '^') that each such key holds, with no --include
        that could re-admit one. Other patterns may or may not match: not a proof."""
        names = dir_key.rstrip("/").split("/")
        if self._exd and any(not self._decide(n, self._exd, self._ind) for n in names):
            return True
        if self._in:
            return False
        for p in self._ex:
            text, anchored = _plain_text(p)
            if text is not None and (dir_key.startswith(text) if anchored else text in dir_key):
                return True
        return False

    def admits(self, key: str) -> bool:
        if (self._exd or self._ind) and "/" in key:
            dirs = key.split("/")[:-1]
            if self._exd:
                if any(not self._decide(d, self._exd, self._ind) for d in dirs):
                    return False
            elif not any(self._decide(d, [], self._ind) for d in dirs):
                return False
        elif self._ind and not self._exd:
            return False  # --include-dir alone selects keys under matching directories
        return self._decide(key, self._ex, self._in)


@dataclass(frozen=True)
class KeyRange:
    """--start / --end: inclusive bounds on keys (relative to the source root)."""

    start: str = ""
    end: str = ""

    def __post_init__(self) -> None:
        if self.start and self.end and self.start > self.end:
            hint = (f" ('--end={self.end}' has one '=' too many: write --end={self.end[1:]})"
                    if self.end.startswith("=") else "")
            raise UsageError(f"--start {self.start!r} sorts after --end {self.end!r}: no key can be in that "
                             f"range; give --start <= --end{hint}")

    def start_after(self) -> str:
        """The `start_after` that makes a listing begin at `start` (inclusive)."""
        if not self.start:
            return ""
        # listing APIs take an exclusive bound; a proper prefix of `start` sorts below it, and
        # the few keys between the two are dropped by `contains`
        return self.start[:-1]

    def contains(self, key: str) -> bool:
        return (not self.start or key >= self.start) and (not self.end or key <= self.end)

    def past_end(self, key: str) -> bool:
        return bool(self.end) and key > self.end


def ranged(entries: Iterable[Entry], key_range: KeyRange) -> Iterator[Entry]:
    """Entries within the key range; stops reading at the first key past the end."""
    for e in entries:
        if key_range.past_end(e.key):
            return
        if key_range.contains(e.key):
            yield e


def checked_order(entries: Iterable[Entry], where: str) -> Iterator[Entry]:
    """Pass entries through, refusing a listing that is not strictly ascending: the merge (and so
    --delete-dst) would otherwise take present keys for missing ones."""
    last: str | None = None
    for e in entries:
        if last is not None and e.key <= last:
            raise StorageError(
                f"listing of {where} is not in ascending key order ({last!r} then {e.key!r}); "
                "refusing to compare it",
                code="UnsortedListing",
            )
        last = e.key
        yield e


Pair = tuple[Entry | None, Entry | None]
def as_file_tree(entries: Iterable[Entry], drop: Callable[[Entry, str], None]) -> Iterator[Entry]:
    """The entries of an ascending listing that a file system can hold, in the same order: it
    cannot hold a file `a` and a file `a/b`, which an object store can. The directory wins, as in
    rclone, whatever order the copies would run in: each file in its way goes to `drop(entry,
    child_key)`. A directory marker (a key ending in '/') stands for its directory: it goes to
    `drop(entry, "")`, and a file of the same name loses to it as well.

    A file is held back until the keys that could show it to be a directory have passed, and the
    keys after it with it. Those all extend its name by a character that sorts before '/'
    (`a` then `a.txt`, `a-1`): few in practice."""
    held: deque[Entry] = deque()
    waiting: dict[str, Entry] = {}  # the held files not dropped, by key
    for e in entries:
        k = e.key
        # the front is decided once dropped, or past every key under its name + "/"
        while held and (held[0].key not in waiting or k >= held[0].key + "0"):
            if waiting.pop(held[0].key, None) is not None:
                yield held[0]
            held.popleft()
        i = k.find("/")
        while i > 0:  # the files this key is under: its prefixes that end before a '/'
            parent = waiting.pop(k[:i], None)
            if parent is not None:
                drop(parent, k)
            i = k.find("/", i + 1)
        if k.endswith("/"):
            drop(e, "")
        else:
            held.append(e)
            waiting[k] = e
    for e in held:
        if e.key in waiting:
            yield e


def merge(src: Iterable[Entry], dst: Iterable[Entry]) -> Iterator[Pair]:
    """Merge two ascending listings into (source, destination) pairs keyed alike; a side is None
    where that key exists only on the other side. Python compares str by code point, which is
    the UTF-8 byte order object stores list in."""
    si, di = iter(src), iter(dst)
    s = next(si, None)
    d = next(di, None)
    while s is not None or d is not None:
        if d is None or (s is not None and s.key < d.key):
            yield s, None
            s = next(si, None)
        elif s is None or d.key < s.key:
            yield None, d
            d = next(di, None)
        else:
            yield s, d
            s = next(si, None)
            d = next(di, None)
