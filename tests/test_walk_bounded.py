"""Local and SFTP walks in bounded memory: a directory longer than sorting.RUN_SIZE is sorted on
disk (storage/local.py `sorted_walk`) and lists exactly what, and in the order, the in-memory sort
lists: names that are not UTF-8, prefixes of each other, `a-b` before `a/x`, symlink loops and
dangling links, prefix / start_after."""

from __future__ import annotations

import logging
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_local_sftp import FS, make_fs
from test_sorting import needs_proc, open_temp_files, small_runs

from ossimport.address import parse_address
from ossimport.storage import Storage, StorageOptions, open_storage, sorting
from ossimport.storage.base import Entry
from ossimport.storage.local import Node, sorted_walk

RUN = 7  # entries sorted in memory at a time in the small-run walks
HUGE = 10**9  # every directory sorted in memory: the walk as it was

UTF8_NAMES = ["a b", "a-b", "a.b", "a0", "ab", "x", "xx", "xxx", "xy", "~", "ä", "日本.txt",
              *(f"f{i:02d}" for i in range(12))]
NOT_UTF8 = [b"caf\xe9", b"\xff", b"\xc3", b"\xfe-dir/n\xe9", b"\xfe-dir/plain"]  # Latin-1, bare bytes


def build_tree(top: Path, *, not_utf8: bool) -> None:
    """Directories longer than RUN at two levels, files of distinct sizes and mtimes."""
    files = [n.encode() for n in UTF8_NAMES]
    files += [f"a/{n}".encode() for n in ("x", "x0", "x-", "y0", "z", "zz", "zzz", "w", "v")]
    files += [b"a/y/z", b"a/y/zz", "日本/語".encode()]
    files += [f"big/{n:03d}".encode() for n in range(40)]
    if not_utf8:
        files += NOT_UTF8
    for i, rel in enumerate(files):
        path = os.path.join(os.fsencode(top), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * i)
        os.chmod(path, 0o600 + (i % 2) * 0o44)
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i))


def add_links(top: Path) -> None:
    (top / "big" / "up").symlink_to("..")  # a loop back to the root when followed
    (top / "a" / "here").symlink_to(".")  # a loop to its own directory
    (top / "dangling").symlink_to("nowhere")
    (top / "big" / "dangling2").symlink_to("../nowhere")
    (top / "link_dir").symlink_to("a")
    (top / "link_file").symlink_to("a0")


def spy_spills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the directories the walk sends through the external sort."""
    calls: list[int] = []
    real = sorting.sorted_records

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sorting, "sorted_records", counting)
    return calls


def listing(open_storage: Callable[[], Storage], run_size: int, monkeypatch: pytest.MonkeyPatch,
            caplog: pytest.LogCaptureFixture, prefix: str = "", start_after: str = "") -> tuple[Any, ...]:
    """Everything a walk tells its user: entries with sizes, mtimes and modes, skipped links with
    their reasons, list errors; and how many directories were sorted on disk."""
    with monkeypatch.context() as mp:
        mp.setattr(sorting, "RUN_SIZE", run_size)
        spills = spy_spills(mp)
        st = open_storage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ossimport"):
            entries = [(e.key, e.size, e.mtime, e.mode) for e in st.list(prefix=prefix, start_after=start_after)]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    return entries, skipped, list(st.options.skipped_links), list(st.list_errors), len(spills)


def byte_order(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def opened_fs(backend_factory: Callable[[str], Any], name: str) -> Iterator[FS]:
    f = make_fs(backend_factory, name)
    yield f
    for st in f.opened:
        st.close()


@pytest.fixture(params=["local", "sftp"])
def fs(request: pytest.FixtureRequest, backend_factory: Callable[[str], Any]) -> Iterator[FS]:
    yield from opened_fs(backend_factory, request.param)


@pytest.fixture
def local_fs(backend_factory: Callable[[str], Any]) -> Iterator[FS]:
    yield from opened_fs(backend_factory, "local")


@pytest.fixture
def sftp_fs(backend_factory: Callable[[str], Any]) -> Iterator[FS]:
    yield from opened_fs(backend_factory, "sftp")


WHERE = [("", ""), ("a", ""), ("a/", ""), ("", "a-b"), ("", "a/"), ("", "a/x"), ("", "a/y/z"), ("x", "xx"),
         ("big/", "big/020"), ("big", "big/up"), ("日", ""), ("", "~")]


@pytest.mark.parametrize("follow", [False, True], ids=["links-skipped", "links-followed"])
def test_small_runs_list_exactly_what_one_run_lists(fs: FS, follow: bool, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Runs of 7 (the root, a/ and big/ sorted on disk) against one run per directory: the same
    entries in the same order with the same sizes, mtimes and modes, the same skipped links for
    the same reasons (a loop stays a loop after the round trip through the temporary files), for
    every prefix / start_after."""
    local = fs.name == "local"  # SFTP names are UTF-8 (paramiko sends and reads them so)
    build_tree(fs.dir, not_utf8=local)
    add_links(fs.dir)
    open_it = lambda: fs.open(follow_symlinks=follow)  # noqa: E731
    for prefix, after in WHERE:
        small = listing(open_it, RUN, monkeypatch, caplog, prefix, after)
        whole = listing(open_it, HUGE, monkeypatch, caplog, prefix, after)
        assert small[:4] == whole[:4], (prefix, after)
        assert whole[4] == 0
        if (prefix, after) == ("", ""):
            assert small[4] >= 3  # the root, a/ and big/ (and link_dir/ when followed) went to disk
    entries, skipped, links, errors, _ = listing(open_it, RUN, monkeypatch, caplog)
    keys = [k for k, *_ in entries]
    assert keys == sorted(keys, key=byte_order) and len(set(keys)) == len(keys)
    assert keys.index("a-b") < keys.index("a/v") < keys.index("a0")  # a dir `a` sorts as `a/`
    assert errors == []
    if local:
        assert os.fsdecode(b"caf\xe9") in keys and os.fsdecode(b"\xfe-dir/n\xe9") in keys
    sizes = {k: s for k, s, *_ in entries}
    assert sizes["a-b"] == UTF8_NAMES.index("a-b") and sizes["big/039"] > sizes["big/000"]
    if follow:
        assert links == ["a/here", "big/dangling2", "big/up", "dangling", "link_dir/here"]
        assert "skipped big/up: symlink loop" in skipped
        assert any(m.startswith("skipped dangling: broken symlink (") for m in skipped)
        assert sizes["link_file"] == sizes["a0"] and "link_dir/zzz" in keys
    else:
        assert links == ["a/here", "big/dangling2", "big/up", "dangling", "link_dir", "link_file"]
        assert "skipped link_dir: symlink not followed" in skipped


def test_local_names_that_are_not_utf8_round_trip(local_fs: FS, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Sorted on disk, a Latin-1 name still sorts by its raw bytes and names the same file."""
    build_tree(local_fs.dir, not_utf8=True)
    entries = listing(lambda: local_fs.open(), RUN, monkeypatch, caplog)[0]
    keys = [k for k, *_ in entries]
    raw = [os.fsencode(k) for k in keys]
    assert raw == sorted(raw)
    for rel in NOT_UTF8:
        key = os.fsdecode(rel)
        assert key in keys
        assert os.path.getsize(os.path.join(os.fsencode(local_fs.dir), rel)) == entries[keys.index(key)][1]


def test_one_run_stays_in_memory_one_more_goes_to_disk(local_fs: FS, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    for i in range(RUN):
        (local_fs.dir / f"n{i}").write_bytes(b"")
    assert listing(lambda: local_fs.open(), RUN, monkeypatch, caplog)[4] == 0
    (local_fs.dir / "n7").write_bytes(b"")
    assert listing(lambda: local_fs.open(), RUN, monkeypatch, caplog)[4] == 1


def fds_into(directory: Path) -> list[str]:
    """What this process holds open in `directory` (a scandir of it, a file below it)."""
    return [t for t in open_temp_files(directory.parent) if t == str(directory) or t.startswith(f"{directory}/")]


@needs_proc
def test_a_walk_closed_early_leaves_nothing_open(fs: FS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped inside big/ (below the root, both sorted on disk): the temporary files of both
    sorts and the directory listings are closed; the storage lists again afterwards."""
    build_tree(fs.dir, not_utf8=False)
    spill = small_runs(monkeypatch, tmp_path)
    st = fs.open()
    walk = st.list()
    first = [next(walk).key for _ in range(30)]
    assert "big/000" in first
    assert len(open_temp_files(spill)) >= 2
    walk.close()
    assert open_temp_files(spill) == []
    if fs.name == "local":
        assert fds_into(fs.dir) == []
    assert [e.key for e in st.list()][:30] == first


@needs_proc
def test_a_walk_that_fails_closes_its_sorts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory that fails part way while its parent is sorted on disk: the error reaches the
    caller, and every temporary file is closed."""
    spill = small_runs(monkeypatch, tmp_path)

    def scan(dir_key: str, ident: object) -> Iterator[Node]:
        for i in range(20):
            if dir_key == "d05/" and i == 10:
                raise OSError("the disk went away")
            yield Node(f"d{i:02d}", "dir") if not dir_key else Node(f"f{i:02d}", "file")

    walk = sorted_walk(scan, lambda key, node: Entry(key, 0, 0.0))
    with pytest.raises(OSError, match="the disk went away"):
        for entry in walk:
            assert entry.key < "d05/"
            assert open_temp_files(spill)  # the root's runs, open while its directories are walked
    assert open_temp_files(spill) == []


def walk_peak(top: Path, run_size: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """How many files `Storage.list()` of `top` gives, and the traced peak of the walk."""
    monkeypatch.setattr(sorting, "RUN_SIZE", run_size)
    storage = open_storage(parse_address(str(top)), StorageOptions())
    tracemalloc.start()
    try:
        count = sum(1 for _ in storage.list())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


def test_one_huge_directory_walks_in_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 empty files in one directory: with runs of 1,000 the walk's traced peak is a small
    fraction of the walk that sorts the directory in memory (a ratio, not bytes or seconds)."""
    top = tmp_path / "flat"
    top.mkdir()
    for i in range(100_000):
        os.close(os.open(top / f"img_{i:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    n_runs, runs = walk_peak(top, 1000, monkeypatch)
    n_memory, in_memory = walk_peak(top, HUGE, monkeypatch)
    assert n_runs == n_memory == 100_000
    assert runs * 20 < in_memory, (runs, in_memory)


def traced_peak(run: Callable[[], int]) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


def test_sftp_flat_directory_is_read_as_it_comes(sftp_fs: FS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flat SFTP directory is read one READDIR reply at a time: the walk with runs of 500 peaks
    at a small fraction of the walk that sorts it in memory, and list_dirs (the job scanner's split)
    keeps only the subdirectories, so its peak stays put with four times the files."""
    flat = sftp_fs.dir / "flat"
    flat.mkdir()
    (flat / "sub").mkdir()

    def add_files(start: int, stop: int) -> None:
        for i in range(start, stop):
            os.close(os.open(flat / f"img_{i:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))

    add_files(0, 10_000)
    st = sftp_fs.open()
    st.list_dirs()  # connect first: the connection's buffers are not the listing's
    monkeypatch.setattr(sorting, "RUN_SIZE", 500)
    n_runs, runs = traced_peak(lambda: sum(1 for _ in st.list()))
    monkeypatch.setattr(sorting, "RUN_SIZE", HUGE)
    n_memory, in_memory = traced_peak(lambda: sum(1 for _ in st.list()))
    assert n_runs == n_memory == 10_000
    assert runs * 5 < in_memory, (runs, in_memory)

    _, dirs_peak = traced_peak(lambda: len(st.list_dirs("flat/")))
    add_files(10_000, 40_000)
    _, dirs_peak_4x = traced_peak(lambda: len(st.list_dirs("flat/")))
    assert st.list_dirs("flat/") == ["flat/sub/"]
    assert dirs_peak_4x < 1.5 * dirs_peak, (dirs_peak, dirs_peak_4x)
