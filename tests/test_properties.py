"""Property test: `sync --delete-dst` local -> S3 -> local reproduces any tree after any edits.

Hypothesis draws a small tree (names from a safe alphabet plus some unicode, up to 3 levels,
0-3 KiB files) and a sequence of operations: create, edit in place keeping the size (mtime bumped
forward by at least 2 s), delete, rename. After every step the CLI (in-process: `cli.main` returns
the exit code) runs `sync --delete-dst` from the source directory to a fresh S3 root on moto, then
from S3 into a second directory. The second directory, the S3 root and an independent oracle (a
plain `shutil.copytree` of the source into a third directory) must all hold exactly the source's
files, byte for byte.

Two things the generator avoids on purpose, each pinned down by its own test below:
- a name that was a file becoming a directory (or back) in a later step: see
  `test_file_replaced_by_directory_of_the_same_name`;
- a same-size edit landing in the same wall-clock second as the previous upload of that key:
  S3 keeps LastModified in whole seconds, so the second hop cannot see it (documented in README:
  "compared in whole seconds"); the test waits for the next second before syncing an edit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ossimport import cli

ALPHABET = "abcxyzABZ019_-éü文Ω"
SEGMENT = st.text(ALPHABET, min_size=1, max_size=6)
CONTENT = st.binary(min_size=0, max_size=3 * 1024)


def files_of(top: Path) -> dict[str, bytes]:
    """relative path -> bytes of every regular file below `top`."""
    out: dict[str, bytes] = {}
    for d, _, names in os.walk(top):
        for name in names:
            path = Path(d, name)
            out[path.relative_to(top).as_posix()] = path.read_bytes()
    return out


@contextlib.contextmanager
def quiet_cli() -> Iterator[io.StringIO]:
    """cli.main() resets the root logger for the CLI; give pytest its handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.getLogger("ossimport")
    our_level = ours.level
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        ours.setLevel(our_level)


def sync(src: str, dst: str) -> None:
    with quiet_cli() as out:
        code = cli.main(["-q", "--threads", "4", "--delete-dst", "sync", src, dst])
    assert code == 0, f"sync {src} {dst} -> exit {code}\n{out.getvalue()}"


class Tree:
    """The source directory plus the bookkeeping that keeps generated names consistent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, bytes] = {}
        self.ever_files: set[str] = set()  # a name once a file never becomes a directory, and back
        self.ever_dirs: set[str] = set()

    def allowed(self, path: str) -> bool:
        parts = path.split("/")
        dirs = {"/".join(parts[:i]) for i in range(1, len(parts))}
        return (path not in self.files and path not in self.ever_dirs and not (dirs & self.ever_files)
                and not any(f.startswith(path + "/") for f in self.files))

    def write(self, path: str, data: bytes, mtime: float | None = None) -> None:
        p = self.root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtime is not None:
            os.utime(p, (mtime, mtime))
        self.files[path] = data
        self.ever_files.add(path)
        parts = path.split("/")
        self.ever_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    def delete(self, path: str) -> None:
        (self.root / path).unlink()
        del self.files[path]

    def rename(self, old: str, new: str) -> None:
        target = self.root / new
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / old, target)
        self.files[new] = self.files.pop(old)
        self.ever_files.add(new)
        parts = new.split("/")
        self.ever_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))


def draw_path(data: st.DataObject, tree: Tree) -> str | None:
    for _ in range(20):  # bounded: a few draws always find a free name in practice
        depth = data.draw(st.integers(1, 3), label="depth")
        path = "/".join(data.draw(SEGMENT, label="segment") for _ in range(depth))
        if tree.allowed(path):
            return path
    return None


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ossimport-prop-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=15, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_sync_round_trip_equals_source_and_oracle(backend_factory: Any, scratch: Path, data: st.DataObject) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()  # a fresh S3 root per example
    s3_addr = s3.address(root)
    work = Path(tempfile.mkdtemp(dir=scratch))
    tree = Tree(work / "src")
    tree.root.mkdir()
    back, oracle = work / "back", work / "oracle"

    for _ in range(data.draw(st.integers(0, 6), label="initial files")):
        path = draw_path(data, tree)
        if path is not None:
            tree.write(path, data.draw(CONTENT, label="content"))

    last_sync = 0.0
    steps = data.draw(st.integers(1, 6), label="steps")
    for step in range(steps + 1):  # step 0 syncs the initial tree
        edited = False
        if step:
            kinds = ["create"] + (["edit", "delete", "rename"] if tree.files else [])
            kind = data.draw(st.sampled_from(kinds), label="operation")
            if kind == "create":
                path = draw_path(data, tree)
                if path is not None:
                    tree.write(path, data.draw(CONTENT, label="content"))
            else:
                victim = data.draw(st.sampled_from(sorted(tree.files)), label="file")
                if kind == "edit":
                    old = tree.files[victim]
                    new = bytes((b + 1) % 256 for b in old)  # same size, every byte differs
                    mtime = max(os.stat(tree.root / victim).st_mtime, time.time()) + 2
                    tree.write(victim, new, mtime=mtime)
                    edited = True
                elif kind == "delete":
                    tree.delete(victim)
                else:
                    target = draw_path(data, tree)
                    if target is not None:
                        tree.rename(victim, target)
        if edited:
            # S3 LastModified has whole seconds: an upload in the same second as the previous one
            # would look unchanged to the second hop (see the module docstring)
            while int(time.time()) <= int(last_sync):
                time.sleep(0.05)
        sync(f"{tree.root}/", s3_addr)
        sync(s3_addr, f"{back}/")
        last_sync = time.time()

        shutil.rmtree(oracle, ignore_errors=True)
        shutil.copytree(tree.root, oracle, symlinks=True)
        want = files_of(tree.root)
        assert want == tree.files, "the bookkeeping matches the disk"
        with s3.storage(root) as st3:
            remote = {e.key: e.size for e in st3.list()}
        assert remote == {k: len(v) for k, v in want.items()}, f"S3 after step {step}"
        got = files_of(back)
        assert got == want, f"S3 -> local after step {step}"
        assert got == files_of(oracle), "equals a plain recursive copy"
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.xfail(strict=True, reason="engine/runner.py deletes destination extras only after copying, so on a "
                   "file-system destination the old file 'a' blocks the copy of 'a/b' (PathConflict: 'a is a file, "
                   "but a directory is needed there'); the failure cancels --delete-dst, so every later sync "
                   "fails the same way")
def test_file_replaced_by_directory_of_the_same_name(tmp_path: Path, backend_factory: Any) -> None:
    s3 = backend_factory("s3-moto")
    s3_addr = s3.address(s3.new_root())
    src, back = tmp_path / "src", tmp_path / "back"
    src.mkdir()
    (src / "a").write_bytes(b"file")
    sync(f"{src}/", s3_addr)
    sync(s3_addr, f"{back}/")
    (src / "a").unlink()
    (src / "a").mkdir()
    (src / "a" / "b").write_bytes(b"now a directory")
    sync(f"{src}/", s3_addr)
    sync(s3_addr, f"{back}/")
    assert files_of(back) == {"a/b": b"now a directory"}
