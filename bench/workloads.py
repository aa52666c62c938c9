"""Deterministic benchmark data sets: the same names, sizes, bytes and mtimes on every machine.

Each workload is a list of (relative path, size). A file's bytes come from a PRNG seeded by the
workload name and path; every mtime is fixed (FIXED_MTIME) so sync tools see identical trees.
A tree is written once under the cache directory and reused while its marker file matches.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
FIXED_MTIME = 1_700_000_000  # 2023-11-14, far enough in the past for every sync tool
FORMAT = 1  # bump when the generation changes, so cached trees are rebuilt
CHUNK = 8 * MiB


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    entries_fn: Callable[[], Iterator[tuple[str, int]]]

    def entries(self) -> Iterator[tuple[str, int]]:
        return self.entries_fn()

    def totals(self) -> tuple[int, int]:
        count = total = 0
        for _, size in self.entries():
            count += 1
            total += size
        return count, total

    def keys(self, limit: int = 200_000) -> set[str] | None:
        """The set of relative paths, or None for trees too big to compare name by name."""
        out: set[str] = set()
        for rel, _ in self.entries():
            out.add(rel)
            if len(out) > limit:
                return None
        return out


def _grid(*dims: int, size: int, ext: str = ".dat") -> Callable[[], Iterator[tuple[str, int]]]:
    """A nested tree: dims[:-1] levels of folders, dims[-1] files in each leaf folder."""

    def gen() -> Iterator[tuple[str, int]]:
        def rec(level: int, parts: list[str]) -> Iterator[tuple[str, int]]:
            n = dims[level]
            if level == len(dims) - 1:
                for i in range(n):
                    yield "/".join([*parts, f"f{i:04d}{ext}"]), size
                return
            for i in range(n):
                yield from rec(level + 1, [*parts, f"d{level}{i:03d}"])

        yield from rec(0, [])

    return gen


def _single(name: str, size: int) -> Callable[[], Iterator[tuple[str, int]]]:
    def gen() -> Iterator[tuple[str, int]]:
        yield name, size

    return gen


def _mixed(
    seed: int = 20240501, lo: int = KiB, hi: int = 64 * MiB, cap: int = GiB
) -> Callable[[], Iterator[tuple[str, int]]]:
    """Log-uniform sizes in [lo, hi], stopping before the total passes `cap`."""

    def gen() -> Iterator[tuple[str, int]]:
        rng = random.Random(seed)
        total = 0
        for i in range(100_000):  # bounded; the cap stops it long before
            size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            if total + size > cap:
                break
            total += size
            yield f"m{i % 8}/file{i:05d}.bin", size

    return gen


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("small2k", "2,000 files x 4 KiB, 20 folders x 100", _grid(20, 100, size=4 * KiB)),
        Workload("small20k", "20,000 files x 4 KiB, 20 x 10 folders x 100", _grid(20, 10, 100, size=4 * KiB)),
        Workload("big256", "one 256 MiB file", _single("big256.bin", 256 * MiB)),
        Workload("big1g", "one 1 GiB file", _single("big1g.bin", GiB)),
        Workload("mixed", "log-uniform sizes 1 KiB-64 MiB, ~1 GiB in all (seeded)", _mixed()),
        Workload("insync100k", "100,000 files x 1 KiB, 100 folders x 1,000", _grid(100, 1000, size=KiB)),
        Workload("mem1m", "1,000,000 empty files, 1,000 folders x 1,000", _grid(1000, 1000, size=0)),
    )
}


def _write_file(path: Path, seed: int, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if size:
            rng = random.Random(seed)
            left = size
            while left > 0:
                n = min(left, CHUNK)
                os.write(fd, rng.randbytes(n))
                left -= n
        os.utime(fd, (FIXED_MTIME, FIXED_MTIME))
    finally:
        os.close(fd)


def materialize(workload: Workload, cache: Path) -> Path:
    """Write the tree under cache/<name>/ unless a matching marker says it is already there."""
    root = cache / workload.name
    marker = cache / f"{workload.name}.ok"
    count, total = workload.totals()
    want = {"format": FORMAT, "count": count, "bytes": total}
    if marker.exists() and root.is_dir():
        try:
            if json.loads(marker.read_text()) == want:
                return root
        except (OSError, ValueError):
            pass
    marker.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    made: set[str] = set()
    for rel, size in workload.entries():
        parent = os.path.dirname(rel)
        if parent not in made:
            (root / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        _write_file(root / rel, zlib.crc32(f"{workload.name}/{rel}".encode()), size)
    for d in sorted(made, key=len, reverse=True):  # folders last, so their mtimes stay fixed too
        os.utime(root / d, (FIXED_MTIME, FIXED_MTIME))
    marker.write_text(json.dumps(want))
    return root


def scan_local(root: Path) -> tuple[int, int, set[str]]:
    """Count and size the files under root; also return their relative paths."""
    count = total = 0
    keys: set[str] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    count += 1
                    total += e.stat(follow_symlinks=False).st_size
                    keys.add(os.path.relpath(e.path, root).replace(os.sep, "/"))
    return count, total, keys
