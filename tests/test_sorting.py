"""The bounded-memory sort behind the listings of sources that are not read in order
(ossimport/storage/sorting.py): byte order, stability, temporary files, memory."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossimport.errors import StorageError
from ossimport.storage import sorting
from ossimport.storage.base import Entry
from ossimport.storage.sorting import sorted_entries, sorted_records

ALPHABET = ["a", "b", "/", "-", " ", "0", "é", "ü", "文", "件", "😀", "\u007f", "\uffff", "\U0010ffff"]


def random_keys(n: int, seed: int) -> list[str]:
    """`n` keys, some repeated, many the prefix of others ("a", "a/", "a/b", "a-")."""
    rng = random.Random(seed)
    keys: list[str] = []
    while len(keys) < n:
        if keys and rng.random() < 0.3:
            base = rng.choice(keys)  # extend (or repeat) a key: prefixes of each other
            keys.append(base + "".join(rng.choices(ALPHABET, k=rng.randrange(0, 3))))
        else:
            keys.append("".join(rng.choices(ALPHABET, k=rng.randrange(1, 8))))
    return keys


def open_temp_files(directory: Path) -> list[str]:
    """The files in `directory` this process holds open (read through /proc/self/fd)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith(f"{directory}/"):
            out.append(target)
    return out


def small_runs(monkeypatch: pytest.MonkeyPatch, directory: Path) -> Path:
    """Make every listing sort spill runs of 7 records to `directory`/spill (the system temp dir
    for this test), so a test can see them with `open_temp_files`."""
    spill = directory / "spill"
    spill.mkdir()
    monkeypatch.setattr(sorting, "RUN_SIZE", 7)
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    return spill


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"),
                                reason="needs /proc/self/fd to see the temporary files held open")


@pytest.mark.parametrize("fan_in", [sorting.FAN_IN, 3])
def test_byte_order_and_stable_over_many_small_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fan_in: int) -> None:
    """Runs of 7 over 3000 keys: hundreds of runs, merged in a cascade (`fan_in` at a time; 3 makes
    it six levels deep). The result is sorted(…) by UTF-8 bytes, equal keys in their input order."""
    monkeypatch.setattr(sorting, "FAN_IN", fan_in)
    keys = random_keys(3000, seed=1)
    records = [(k, i) for i, k in enumerate(keys)]
    assert len(set(keys)) < len(keys) and any(a != b and b.startswith(a) for a, b in zip(keys, keys[1:], strict=False))
    out = list(sorted_records(iter(records), run_size=7, directory=str(tmp_path)))
    assert [k for k, _ in out] == sorted(keys, key=lambda k: k.encode())
    assert out == sorted(records, key=lambda r: r[0].encode())  # Python's sort is stable: so is ours
    assert os.listdir(tmp_path) == []


def test_small_input_never_touches_the_disk(tmp_path: Path) -> None:
    keys = random_keys(50, seed=2)
    missing = tmp_path / "missing"  # a spill there would fail
    assert [r[0] for r in sorted_records(((k,) for k in keys), run_size=50, directory=str(missing))] == \
        sorted(keys, key=lambda k: k.encode())


def test_entries_keep_every_field(tmp_path: Path) -> None:
    entries = [Entry(f"k{i % 37}/{i}", i, i + 0.5, f"etag{i}" if i % 2 else None,
                     {"md5": f"{i:032x}"} if i % 3 else {}, 0o640 if i % 5 else None,
                     "target" if i % 7 == 0 else None) for i in range(500)]
    random.Random(3).shuffle(entries)
    assert list(sorted_entries(entries, run_size=7, directory=str(tmp_path))) == \
        sorted(entries, key=lambda e: e.key.encode())


@needs_proc
def test_temporary_files_are_anonymous_and_closed_at_the_end(tmp_path: Path) -> None:
    keys = random_keys(1000, seed=4)
    it = sorted_records(((k,) for k in keys), run_size=7, directory=str(tmp_path))
    first = next(it)
    held = open_temp_files(tmp_path)
    assert held and all(t.endswith(" (deleted)") for t in held)  # spilled, and no name left to sweep
    assert os.listdir(tmp_path) == []
    assert [first, *it][-1] == (max(keys, key=lambda k: k.encode()),)
    assert open_temp_files(tmp_path) == []


@needs_proc
def test_open_files_stay_few_however_many_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """429 runs merged 3 at a time: at most 2 runs per level of the cascade stay open (6 levels)."""
    monkeypatch.setattr(sorting, "FAN_IN", 3)
    it = sorted_records(((k,) for k in random_keys(3000, seed=10)), run_size=7, directory=str(tmp_path))
    next(it)
    assert 0 < len(open_temp_files(tmp_path)) <= 2 * 6
    it.close()


@needs_proc
def test_temporary_files_are_closed_when_the_consumer_stops_early(tmp_path: Path) -> None:
    it = sorted_entries((Entry(k, 1, 0.0) for k in random_keys(1000, seed=5)), run_size=7, directory=str(tmp_path))
    next(it)
    assert open_temp_files(tmp_path)
    it.close()
    assert open_temp_files(tmp_path) == []


@needs_proc
def test_temporary_files_are_closed_when_the_input_fails(tmp_path: Path) -> None:
    def failing() -> Iterator[tuple[str]]:
        for i, k in enumerate(random_keys(1000, seed=6)):
            if i == 500:
                assert open_temp_files(tmp_path)  # runs were spilled before the failure
                raise OSError("the list file went away")
            yield (k,)

    with pytest.raises(OSError, match="went away"):
        list(sorted_records(failing(), run_size=7, directory=str(tmp_path)))
    assert open_temp_files(tmp_path) == []


@needs_proc
def test_temporary_files_are_closed_when_the_consumer_fails(tmp_path: Path) -> None:
    it = sorted_records(((k,) for k in random_keys(1000, seed=7)), run_size=7, directory=str(tmp_path))
    next(it)
    with pytest.raises(RuntimeError):
        it.throw(RuntimeError("the copy failed"))
    assert open_temp_files(tmp_path) == []


def test_a_killed_process_leaves_no_temporary_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of a merge: the spilled runs had no names, so nothing is left."""
    script = textwrap.dedent(f"""
        import sys
        from ossimport.storage.sorting import sorted_records
        it = sorted_records(((str(i * 7919 % 10007),) for i in range(10007)), run_size=100,
                            directory={str(tmp_path)!r})
        next(it)
        print("merging", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(sorting.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "merging\n"
        if os.path.isdir(f"/proc/{proc.pid}/fd"):
            held = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
            assert any(t.startswith(f"{tmp_path}/") for t in held)  # it did spill here
        proc.kill()
    finally:
        proc.kill()
        proc.wait(30)
    assert os.listdir(tmp_path) == []


def test_a_temporary_directory_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(StorageError) as err:
        list(sorted_records(((k,) for k in random_keys(100, seed=8)), run_size=7, directory=str(missing)))
    assert err.value.code == "TempFileError"
    assert str(err.value).startswith(f"sorting a listing: cannot write a temporary file in {missing}: ")
    assert "TMPDIR" in str(err.value)


def peak_bytes(sort: str, n: int) -> int:
    """The traced peak of sorting `n` fresh records ("memory": sorted(); "runs": runs of 1,000)."""
    def records() -> Iterator[tuple[str, int]]:
        rng = random.Random(9)
        for i in range(n):
            yield (f"dir/{rng.getrandbits(64):016x}/file-{i}.bin", i)

    tracemalloc.start()
    try:
        if sort == "memory":
            ordered: Iterator[tuple[str, int]] = iter(sorted(records(), key=lambda r: r[0].encode()))
        else:
            ordered = sorted_records(records(), run_size=1000)
        count = sum(1 for _ in ordered)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    return peak


def test_memory_stays_bounded_as_the_count_grows() -> None:
    """200,000 records: the in-memory sort's peak grows with the count; runs of 1,000 stay at a
    small fraction of it (a ratio, not a number of bytes, so it holds across Python versions)."""
    in_memory, runs = peak_bytes("memory", 200_000), peak_bytes("runs", 200_000)
    assert runs * 20 < in_memory, (runs, in_memory)
