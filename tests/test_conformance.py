"""The storage contract, checked against every backend over its real server.

Each test runs once per module in tests/backends/. Optional abilities are tested only where the
backend declares them; read-only backends are seeded through their module's `seed`.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from ossimport.errors import NotFound, StorageError

TRICKY = {
    "a!": b"1",
    "a b": b"22",
    "a-b": b"333",
    "a.b": b"4444",
    "a/x": b"55555",
    "a0": b"666666",
    "dir/sub/deep.txt": b"deep",
    "dir/z": b"z",
    "empty": b"",
    "ünïcødé/文件.txt": "日本語".encode(),
}


def byte_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


def writable(backend) -> None:  # type: ignore[no-untyped-def]
    if backend.read_only:
        pytest.skip(f"{backend.name} is a read-only source")


def test_list_is_recursive_and_byte_sorted(backend) -> None:  # type: ignore[no-untyped-def]
    root = backend.new_root()
    backend.seed(root, TRICKY)
    st = backend.storage(root)
    entries = list(st.list())
    assert [e.key for e in entries] == byte_sorted(list(TRICKY))
    assert {e.key: e.size for e in entries} == {k: len(v) for k, v in TRICKY.items()}
    assert all(e.mtime > 0 for e in entries)


def test_list_prefix_and_start_after(backend) -> None:  # type: ignore[no-untyped-def]
    root = backend.new_root()
    backend.seed(root, TRICKY)
    st = backend.storage(root)
    assert [e.key for e in st.list(prefix="dir/")] == ["dir/sub/deep.txt", "dir/z"]
    after = [e.key for e in st.list(start_after="a0")]
    assert after == [k for k in byte_sorted(list(TRICKY)) if k.encode() > b"a0"]
    assert [e.key for e in st.list(prefix="dir/", start_after="dir/sub/deep.txt")] == ["dir/z"]


def test_empty_root_lists_nothing(backend) -> None:  # type: ignore[no-untyped-def]
    root = backend.new_root()
    backend.seed(root, {})
    assert list(backend.storage(root).list()) == []


def test_head_and_open_roundtrip(backend) -> None:  # type: ignore[no-untyped-def]
    root = backend.new_root()
    data = os.urandom(300_000)
    backend.seed(root, {"x/blob.bin": data, "zero": b""})
    st = backend.storage(root)
    e = st.head("x/blob.bin")
    assert (e.key, e.size) == ("x/blob.bin", len(data))
    with st.open("x/blob.bin") as f:
        assert f.read() == data
    with st.open("x/blob.bin", 1000, 2000) as f:
        assert f.read() == data[1000:2000]
    with st.open("x/blob.bin", 299_990) as f:
        assert f.read() == data[299_990:]
    assert st.head("zero").size == 0
    with st.open("zero") as f:
        assert f.read() == b""


def test_missing_key_is_not_found(backend) -> None:  # type: ignore[no-untyped-def]
    root = backend.new_root()
    backend.seed(root, {"present": b"p"})
    st = backend.storage(root)
    with pytest.raises(NotFound):
        st.head("absent")
    with pytest.raises(NotFound):
        st.open("absent").read()


def test_put_overwrites_and_delete_is_idempotent(backend) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    root = backend.new_root()
    st = backend.storage(root)
    e = st.put("k/v.txt", io.BytesIO(b"first"), 5)
    assert e.size == 5
    st.put("k/v.txt", io.BytesIO(b"second!"), 7)
    with st.open("k/v.txt") as f:
        assert f.read() == b"second!"
    st.delete("k/v.txt")
    st.delete("k/v.txt")
    with pytest.raises(NotFound):
        st.head("k/v.txt")
    assert list(st.list()) == []


@pytest.mark.parametrize("given", [3, 20])
def test_put_with_wrong_size_writes_nothing(backend, given: int) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    root = backend.new_root()
    st = backend.storage(root)
    with pytest.raises(StorageError) as err:
        st.put("wrong", io.BytesIO(b"0123456789"), given)
    assert err.value.code == "SIZE_NOT_MATCH"
    assert list(st.list()) == []


def test_set_mtime(backend) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    st = backend.storage(backend.new_root())
    if not st.abilities.set_mtime:
        pytest.skip(f"{backend.name} does not keep mtimes")
    st.put("m", io.BytesIO(b"abc"), 3, mtime=1_600_000_000.0)
    assert int(st.head("m").mtime) == 1_600_000_000
    assert int(next(iter(st.list())).mtime) == 1_600_000_000


def test_multipart(backend) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    st = backend.storage(backend.new_root())
    if not st.abilities.multipart:
        pytest.skip(f"{backend.name} has no multipart upload")
    psize = st.abilities.min_part_size
    chunks = [os.urandom(psize), os.urandom(psize), os.urandom(1234)]
    upload = st.create_multipart("big/obj")
    assert ("big/obj", upload) in list(st.list_multipart())
    parts = [None] * 3

    def send(i: int) -> None:
        parts[i] = st.upload_part("big/obj", upload, i + 1, chunks[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    st.complete_multipart("big/obj", upload, parts)  # type: ignore[arg-type]
    with st.open("big/obj") as f:
        got = f.read()
    assert hashlib.md5(got).digest() == hashlib.md5(b"".join(chunks)).digest()
    assert st.head("big/obj").size == 2 * psize + 1234
    assert ("big/obj", upload) not in list(st.list_multipart())

    aborted = st.create_multipart("gone")
    st.upload_part("gone", aborted, 1, b"x" * 100)
    st.abort_multipart("gone", aborted)
    assert all(k != "gone" for k, _ in st.list_multipart())
    with pytest.raises(NotFound):
        st.head("gone")


def test_only_older_uploads_of_a_key_are_aborted(backend) -> None:  # type: ignore[no-untyped-def]
    """The sweep before completing a multipart upload aborts what earlier writers left (started
    before ours) and never a younger upload: another holder of the same job task at work."""
    writable(backend)
    st = backend.storage(backend.new_root())
    if not st.abilities.multipart:
        pytest.skip(f"{backend.name} has no multipart upload")

    def started_after(than: float) -> str:
        """A new upload of "k" that the server dates after `than` (polled: servers date in seconds).
        A server that dates every upload alike (moto) is ordered by its listing alone."""
        deadline = time.monotonic() + 10
        first = None
        while time.monotonic() < deadline:
            upload = st.create_multipart("k")
            when = {u.upload_id: u.initiated for u in st.list_uploads("k")}[upload]
            first = when if first is None else first
            if when > than or (when == first and time.monotonic() > deadline - 8.5):
                return upload
            st.abort_multipart("k", upload)
            time.sleep(0.2)
        raise AssertionError("the server's clock did not advance")

    old = started_after(0)
    ours = started_after({u.upload_id: u.initiated for u in st.list_uploads("k")}[old])
    young = started_after({u.upload_id: u.initiated for u in st.list_uploads("k")}[ours])
    st.create_multipart("k2")  # another key: never touched
    assert st.abort_older_uploads("k", ours) == 1
    left = sorted(st.list_multipart())
    assert left == sorted([("k", ours), ("k", young), ("k2", left[-1][1])]), left
    for key, upload in left:
        st.abort_multipart(key, upload)


def test_random_write(backend) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    st = backend.storage(backend.new_root())
    if not st.abilities.random_write:
        pytest.skip(f"{backend.name} has no random-access writes")
    data = os.urandom(4 * 65536 + 17)
    w = st.open_writer("rw/file", len(data))
    ranges = [(o, min(o + 65536, len(data))) for o in range(0, len(data), 65536)]
    threads = [threading.Thread(target=w.write_at, args=(a, data[a:b])) for a, b in reversed(ranges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert list(st.list()) == [], "nothing is visible before commit"
    w.commit(mtime=1_500_000_000.0)
    with st.open("rw/file") as f:
        assert f.read() == data
    w2 = st.open_writer("rw/aborted", 10)
    w2.write_at(0, b"0123456789")
    w2.abort()
    assert [e.key for e in st.list()] == ["rw/file"]


def test_server_side_copy(backend) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    st = backend.storage(backend.new_root())
    if not st.abilities.server_side_copy:
        pytest.skip(f"{backend.name} has no server-side copy")
    st.put("src", io.BytesIO(b"copy me"), 7)
    st.copy("src", "dst/copied")
    with st.open("dst/copied") as f:
        assert f.read() == b"copy me"
    other = backend.storage(backend.new_root())
    assert other.same_server(st)
    other.copy("src", "from-other", src_root=st)
    with other.open("from-other") as f:
        assert f.read() == b"copy me"


def test_describe_hides_secrets(backend) -> None:  # type: ignore[no-untyped-def]
    st = backend.storage(backend.new_root())
    text = st.describe() + repr(st.location)
    for secret in (st.location.secret_key, st.location.password, st.location.token):
        if secret:
            assert secret not in text


def test_remove_stale_temps(backend) -> None:  # type: ignore[no-untyped-def]
    writable(backend)
    st = backend.storage(backend.new_root())
    st.put("keep/a", io.BytesIO(b"a"), 1)
    if st.abilities.multipart:
        orphan = st.create_multipart("keep/big")
        st.upload_part("keep/big", orphan, 1, b"x" * 10)
        other = st.create_multipart("keep/other")
        assert st.remove_stale_temps(["keep/big", "keep/a"]) == 1
        assert [k for k, _ in st.list_multipart()] == ["keep/other"]
        st.abort_multipart("keep/other", other)
    elif st.abilities.random_write:
        w = st.open_writer("keep/b", 5)  # a writer abandoned as a killed process would
        w.write_at(0, b"12345")
        assert st.remove_stale_temps(["keep/b", "keep/a"]) == 1
        assert st.remove_stale_temps(["keep/b"]) == 0
    assert [e.key for e in st.list()] == ["keep/a"]


def test_list_dirs_one_level(backend) -> None:  # type: ignore[no-untyped-def]
    root = backend.new_root()
    backend.seed(root, {"f": b"1", "a/x": b"2", "a/b/y": b"3", "c d/z": b"4", "é/w": b"5"})
    st = backend.storage(root)
    try:
        top = st.list_dirs()
    except StorageError as exc:
        if exc.code != "NotImplemented":
            raise
        pytest.skip(f"{backend.name} cannot list one level (jobs scan it as one range)")
    assert top == ["a/", "c d/", "é/"]
    assert st.list_dirs("a/") == ["a/b/"]
    assert st.list_dirs("a/b/") == []
    assert st.list_dirs("missing/") == []
