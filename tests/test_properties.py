"""Property test: `sync --delete-dst` local -> S3 -> local reproduces any tree after any edits.

Hypothesis draws a small tree (names from a safe alphabet plus some unicode, up to 3 levels,
0-3 KiB files) and a sequence of operations: create, edit in place keeping the size (mtime bumped
forward by at least 2 s), delete, rename, and a file becoming a directory (or back). After every
step the CLI (in-process: `cli.main` returns the exit code) runs `sync --delete-dst` from the source
directory to a fresh S3 root on moto, then from S3 into a second directory. The oracle is a model
computed from the generated operations alone (`Model`, a dict of path -> bytes that never looks
at a disk): the source directory, the S3 root and the second directory must each hold exactly the
model's files, byte for byte.

A name that was a file may become a directory in a later step, and back: on the local
destination the old file (or directory) is in the way of the new one, and `--delete-dst` removes
it first (also pinned down by `test_file_replaced_by_directory_of_the_same_name` and
`test_delete_dst_clears_what_blocks_a_copy`).

One thing the generator avoids on purpose: a same-size edit landing in the same wall-clock second
as the previous upload of that key: S3 keeps LastModified in whole seconds, so the second hop
cannot see it (documented in README: "compared in whole seconds"); the test waits for the next
second before syncing an edit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import digests
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


class Model:
    """The oracle: what the source holds after the operations, computed from the operations
    alone (it never reads a disk, so a mistake in the code that writes the source cannot hide)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def allowed(self, path: str) -> bool:
        """A free name: not a file, not a directory of one, no file on its way. A name that was a
        file may become a directory in a later step, and back."""
        parts = path.split("/")
        dirs = {"/".join(parts[:i]) for i in range(1, len(parts))}
        return (path not in self.files and not (dirs & self.files.keys())
                and not any(f.startswith(path + "/") for f in self.files))

    def create(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def edit(self, path: str) -> None:
        self.files[path] = bytes((b + 1) % 256 for b in self.files[path])

    def delete(self, path: str) -> None:
        del self.files[path]

    def rename(self, old: str, new: str) -> None:
        self.files[new] = self.files.pop(old)

    def retype(self, victim: str, to_dir: bool, name: str, data: bytes) -> None:
        parent = victim.rpartition("/")[0]
        if to_dir or not parent:  # the file becomes a directory holding `name`
            del self.files[victim]
            self.files[f"{victim}/{name}"] = data
        else:  # the victim's directory becomes a file
            self.files = {k: v for k, v in self.files.items() if not k.startswith(parent + "/")}
            self.files[parent] = data


class Source:
    """The source directory on disk, changed as a user would change it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _prune(self, path: Path) -> None:
        """Remove the directories that `path` leaving made empty (their names are free again)."""
        parent = path.parent
        while parent != self.root and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def create(self, path: str, data: bytes, mtime: float | None = None) -> None:
        p = self.root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtime is not None:
            os.utime(p, (mtime, mtime))

    def edit(self, path: str) -> None:
        """Same size, every byte differs, mtime at least 2 s later."""
        p = self.root / path
        mtime = max(p.stat().st_mtime, time.time()) + 2
        self.create(path, bytes((b + 1) % 256 for b in p.read_bytes()), mtime)

    def delete(self, path: str) -> None:
        (self.root / path).unlink()
        self._prune(self.root / path)

    def rename(self, old: str, new: str) -> None:
        target = self.root / new
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / old, target)
        self._prune(self.root / old)

    def retype(self, victim: str, to_dir: bool, name: str, data: bytes) -> None:
        parent = victim.rpartition("/")[0]
        if to_dir or not parent:
            self.delete(victim)
            self.create(f"{victim}/{name}", data)
            return
        shutil.rmtree(self.root / parent)
        self.create(parent, data)


def draw_path(data: st.DataObject, model: Model) -> str | None:
    for _ in range(20):  # bounded: a few draws always find a free name in practice
        depth = data.draw(st.integers(1, 3), label="depth")
        path = "/".join(data.draw(SEGMENT, label="segment") for _ in range(depth))
        if model.allowed(path):
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
def test_sync_round_trip_equals_the_oracle(backend_factory: Any, scratch: Path, data: st.DataObject) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()  # a fresh S3 root per example
    s3_addr = s3.address(root)
    work = Path(tempfile.mkdtemp(dir=scratch))
    model, source = Model(), Source(work / "src")
    source.root.mkdir()
    back = work / "back"

    def apply(op: str, *args: Any) -> None:
        getattr(model, op)(*args)
        getattr(source, op)(*args)

    for _ in range(data.draw(st.integers(0, 6), label="initial files")):
        path = draw_path(data, model)
        if path is not None:
            apply("create", path, data.draw(CONTENT, label="content"))

    last_sync = 0.0
    steps = data.draw(st.integers(1, 6), label="steps")
    for step in range(steps + 1):  # step 0 syncs the initial tree
        edited = False
        if step:
            kinds = ["create"] + (["edit", "delete", "rename", "retype"] if model.files else [])
            kind = data.draw(st.sampled_from(kinds), label="operation")
            if kind == "create":
                path = draw_path(data, model)
                if path is not None:
                    apply("create", path, data.draw(CONTENT, label="content"))
            else:
                victim = data.draw(st.sampled_from(sorted(model.files)), label="file")
                if kind == "edit":
                    apply("edit", victim)
                    edited = True
                elif kind == "delete":
                    apply("delete", victim)
                elif kind == "rename":
                    target = draw_path(data, model)
                    if target is not None:
                        apply("rename", victim, target)
                else:
                    apply("retype", victim, data.draw(st.booleans(), label="file to directory"),
                          data.draw(SEGMENT, label="segment"), data.draw(CONTENT, label="content"))
        if edited:
            # S3 LastModified has whole seconds: an upload in the same second as the previous one
            # would look unchanged to the second hop (see the module docstring)
            while int(time.time()) <= int(last_sync):
                time.sleep(0.05)
        sync(f"{source.root}/", s3_addr)
        sync(s3_addr, f"{back}/")
        last_sync = time.time()

        want = {k: hashlib.md5(v).hexdigest() for k, v in model.files.items()}
        assert files_of(source.root) == model.files, f"the source after step {step} is what the operations made"
        with s3.storage(root) as st3:
            assert digests(st3) == want, f"S3 after step {step}"
        assert files_of(back) == model.files, f"S3 -> local after step {step}"
    shutil.rmtree(work, ignore_errors=True)


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


def run_cli(*args: str) -> tuple[int, str, str]:
    """cli.main(args) in-process: (exit code, stdout, stderr)."""
    err = io.StringIO()
    with quiet_cli() as out, contextlib.redirect_stderr(err):
        code = cli.main(["--threads", "4", *args])
    return code, out.getvalue(), err.getvalue()


def write_files(top: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (top / key).parent.mkdir(parents=True, exist_ok=True)
        (top / key).write_bytes(data)


@pytest.mark.parametrize("dst_name", ["local", "sftp"])
def test_delete_dst_clears_what_blocks_a_copy(tmp_path: Path, backend_factory: Any, monkeypatch: pytest.MonkeyPatch,
                                              dst_name: str) -> None:
    """On a file-system destination a file where the source now has a directory (`a` -> `a/b`),
    and a directory where the source now has a file (`c/...` -> `c`), block the copies. With
    --delete-dst they are deleted first; without it each blocked copy fails with one line and
    nothing is deleted."""
    dst = backend_factory(dst_name)
    for k, v in dst.env().items():
        monkeypatch.setenv(k, v)
    dst_addr = dst.address(dst.new_root())
    dst_dir = Path(dst_addr.rpartition(":")[2])  # SFTP: the server is this machine
    before, src = tmp_path / "before", tmp_path / "src"
    write_files(before, {"a": b"file a", "c/d": b"in c", "c/e/f": b"deeper in c", "keep": b"same",
                         "old": b"gone from the source", "z/y": b"z"})
    write_files(src, {"a/b": b"a is a directory now", "c": b"c is a file now", "c-1": b"sorts between c and c/",
                      "c.txt": b"so does this", "keep": b"same", "z/y": b"z"})
    assert run_cli("-q", "sync", f"{before}/", dst_addr)[0] == 0
    assert files_of(dst_dir) == files_of(before)

    code, _, err = run_cli("-q", "sync", f"{src}/", dst_addr)
    assert code == 1, err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and all("PathConflict" in line for line in failed), err
    assert any(line.startswith("FAILED a/b: ") for line in failed), err
    assert any(line.startswith("FAILED c: ") for line in failed), err
    assert files_of(dst_dir) == {**files_of(before), "c-1": b"sorts between c and c/", "c.txt": b"so does this"}

    code, out, err = run_cli("--json", "--delete-dst", "sync", f"{src}/", dst_addr)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    # a, c/d, c/e/f and old are extras; all four deleted (three of them before the copies)
    assert (summary["copied"], summary["extra"], summary["deleted"], summary["failed"]) == (2, 4, 4, 0), summary
    assert files_of(dst_dir) == files_of(src)
    assert not (dst_dir / "c").is_dir() and (dst_dir / "a").is_dir()

    code, out, err = run_cli("--json", "--delete-dst", "sync", f"{src}/", dst_addr)
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (summary["copied"], summary["extra"], summary["deleted"]) == (0, 0, 0), (summary, err)


def test_delete_dst_clears_nothing_in_a_dry_run(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_files(dst, {"a": b"file a", "c/d": b"in c"})
    write_files(src, {"a/b": b"a is a directory now", "c": b"c is a file now"})
    code, out, err = run_cli("--json", "--dryrun", "--delete-dst", "sync", f"{src}/", f"{dst}/")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (summary["copied"], summary["deleted"], summary["would_delete"]) == (2, 0, 2), (summary, err)
    assert files_of(dst) == {"a": b"file a", "c/d": b"in c"}


def test_delete_dst_clears_nothing_when_the_source_listing_is_incomplete(tmp_path: Path) -> None:
    """What the source listing left out might be the very file in the way: then the copy fails."""
    from ossimport.address import parse_address
    from ossimport.engine.outcome import Kind, Outcome
    from ossimport.engine.runner import Runner, RunOptions
    from ossimport.storage import open_storage

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_files(dst, {"a": b"file a", "c/d": b"in c"})
    write_files(src, {"a/b": b"a is a directory now", "c": b"c is a file now"})
    with open_storage(parse_address(f"{src}/")) as s, open_storage(parse_address(f"{dst}/")) as d:
        s.list_errors.append("x: permission denied")  # as an unreadable directory would leave it
        events: list[Outcome] = []
        stats = Runner(s, d, RunOptions(delete_dst=True, threads=2), listener=events.append).run()
    assert (stats.copied, stats.deleted) == (0, 0), events
    assert {o.code for o in events if o.kind is Kind.FAILED} >= {"PathConflict"}, events
    assert files_of(dst) == {"a": b"file a", "c/d": b"in c"}
