"""File-system backends (local and SFTP over a real sshd): ordering, symlinks, key safety,
atomic writes, kernel copy, ranged writers and SFTP login errors.

The SFTP server runs on this machine, so tests arrange server-side state (symlinks, fifos) directly
in the directory behind the address.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ossimport.address import parse_address
from ossimport.errors import NotFound, StorageError, UnsafeKey
from ossimport.storage import Storage, StorageOptions, open_storage
from ossimport.storage.local import LocalStorage, sorted_walk, temp_name


def all_files(top: Path) -> list[str]:
    """Every non-directory below `top`, relative, sorted (what is physically there)."""
    return sorted(
        os.path.relpath(os.path.join(d, f), top) for d, dirs, files in os.walk(top) for f in files
    )


@dataclass
class FS:
    """One empty root of a backend, the directory behind it, and a way to open it."""

    name: str
    backend: Any
    root: str
    dir: Path
    opened: list[Storage] = field(default_factory=list)

    def open(self, env: dict[str, str] | None = None, address: str | None = None, **options: Any) -> Storage:
        env = self.backend.env() if env is None else env
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            st = open_storage(parse_address(address or self.backend.address(self.root)), StorageOptions(**options))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.opened.append(st)
        return st


def make_fs(backend_factory: Callable[[str], Any], name: str) -> FS:
    b = backend_factory(name)
    root = b.new_root()
    return FS(name, b, root, Path(parse_address(b.address(root)).path))


@pytest.fixture(params=["local", "sftp"])
def fs(request: pytest.FixtureRequest, backend_factory: Callable[[str], Any]) -> Iterator[FS]:
    f = make_fs(backend_factory, request.param)
    yield f
    for st in f.opened:
        st.close()


@pytest.fixture
def sftp_fs(backend_factory: Callable[[str], Any]) -> Iterator[FS]:
    f = make_fs(backend_factory, "sftp")
    yield f
    for st in f.opened:
        st.close()


def put_bytes(st: Storage, key: str, data: bytes, **kw: Any) -> None:
    st.put(key, io.BytesIO(data), len(data), **kw)


def read_all(st: Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    with st.open(key, start, end) as f:
        return f.read()


# ---- ordering -----------------------------------------------------------------------------------

TRICKY = ["a b", "a-b", "a.b", "a/x", "a/y/z", "a0", "A", "b", "~", "ä", "日本", "日本/語", "d/e/f/g"]
TRICKY_FILES = [k for k in TRICKY if k != "日本"]  # "日本" is a directory (it holds 日本/語)


def byte_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


def test_list_is_globally_byte_sorted(fs: FS) -> None:
    st = fs.open()
    for i, key in enumerate(reversed(TRICKY_FILES)):
        put_bytes(st, key, b"x" * i)
    expected = byte_sorted(TRICKY_FILES)
    # "a/" sorts between "a-b" and "a0": directories order as name + "/"
    assert expected[:6] == ["A", "a b", "a-b", "a.b", "a/x", "a/y/z"]
    assert [e.key for e in st.list()] == expected
    assert [e.key for e in st.list(prefix="a")] == [k for k in expected if k.startswith("a")]
    assert [e.key for e in st.list(prefix="a/")] == ["a/x", "a/y/z"]
    assert [e.key for e in st.list(prefix="日")] == ["日本/語"]
    for after in ["", "a", "a-b", "a/", "a/x", "a/y", "a0", "ä", "日本", "日本/語", "~~"]:
        assert [e.key for e in st.list(start_after=after)] == [
            k for k in expected if k.encode() > after.encode()
        ], after
    sizes = {e.key: e.size for e in st.list()}
    assert sizes == {k: i for i, k in enumerate(reversed(TRICKY_FILES))}


def test_sorted_walk_prunes_directories() -> None:
    """Only directories that can hold wanted keys are scanned."""
    tree = {"": ["d1", "d2", "d3", "f"], "d1/": ["x"], "d2/": ["x", "y"], "d3/": ["x"]}
    scanned: list[str] = []

    def scan(dir_key: str, ident: object) -> list[Any]:
        from ossimport.storage.local import Node

        scanned.append(dir_key)
        return [Node(n, "dir" if dir_key + n + "/" in tree else "file") for n in tree[dir_key]]

    def entry(key: str, node: Any) -> Any:
        from ossimport.storage.base import Entry

        return Entry(key, 0, 0.0)

    keys = [e.key for e in sorted_walk(scan, entry, start_after="d2/x")]
    assert keys == ["d2/y", "d3/x", "f"]
    assert scanned == ["", "d2/", "d3/"]
    scanned.clear()
    assert [e.key for e in sorted_walk(scan, entry, prefix="d3")] == ["d3/x"]
    assert scanned == ["", "d3/"]


def test_local_list_hides_temp_files_and_skips_fifos(backend_factory: Callable[[str], Any]) -> None:
    f = make_fs(backend_factory, "local")
    st = f.open()
    put_bytes(st, "keep", b"k")
    (f.dir / temp_name("keep")).write_bytes(b"half-written")
    os.mkfifo(f.dir / "pipe")
    assert [e.key for e in st.list()] == ["keep"]


def test_missing_root_lists_nothing(fs: FS) -> None:
    address = fs.backend.address(fs.root).rstrip("/") + "/not/there/"
    st = fs.open(address=address)
    assert list(st.list()) == []
    st.delete("nothing")
    put_bytes(st, "first", b"creates the root")
    assert (fs.dir / "not/there/first").read_bytes() == b"creates the root"
    assert [e.key for e in st.list()] == ["first"]


# ---- symlinks ---------------------------------------------------------------------------------


def make_links(top: Path) -> None:
    (top / "real").mkdir()
    (top / "real" / "f.txt").write_bytes(b"file")
    (top / "real" / "loop").symlink_to("..")  # back to the root: a cycle when followed
    (top / "link_dir").symlink_to("real")
    (top / "link_to_file").symlink_to("real/f.txt")
    (top / "dangling").symlink_to("nowhere")


def test_symlinks_skipped_and_recorded(fs: FS) -> None:
    make_links(fs.dir)
    st = fs.open(follow_symlinks=False)
    assert [e.key for e in st.list()] == ["real/f.txt"]
    assert st.options.skipped_links == ["dangling", "link_dir", "link_to_file", "real/loop"]


def test_symlinks_followed_with_loop_detection(fs: FS) -> None:
    make_links(fs.dir)
    st = fs.open(follow_symlinks=True)
    entries = list(st.list())
    assert [e.key for e in entries] == ["link_dir/f.txt", "link_to_file", "real/f.txt"]
    assert all(e.size == 4 for e in entries)
    assert st.options.skipped_links == ["dangling", "link_dir/loop", "real/loop"]
    assert read_all(st, "link_dir/f.txt") == b"file"


# ---- key safety --------------------------------------------------------------------------------

UNSAFE = ["../x", "/abs", "a//b", "a\\b", "a\x00b", "a/./b", "a/../../x", ".", "..", ""]


@pytest.mark.parametrize("key", UNSAFE, ids=repr)
def test_unsafe_keys_are_refused(fs: FS, key: str) -> None:
    st = fs.open()
    before = sorted(os.listdir(fs.dir.parent))
    with pytest.raises(UnsafeKey):
        put_bytes(st, key, b"evil")
    with pytest.raises(UnsafeKey):
        st.open_writer(key, 4)
    if "\\" in key:  # a backslash is refused in names to be made; an existing file may have one
        st.delete(key)
        with pytest.raises(NotFound):
            st.head(key)
    else:
        with pytest.raises(UnsafeKey):
            st.delete(key)
        with pytest.raises(UnsafeKey):
            st.head(key)
    assert sorted(os.listdir(fs.dir.parent)) == before
    assert all_files(fs.dir) == []


def test_symlinked_dir_cannot_redirect_writes_outside(fs: FS, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    (fs.dir / "evil").symlink_to(outside)
    st = fs.open()
    for key in ["evil/x", "evil/sub/deep/x"]:
        with pytest.raises(UnsafeKey):
            put_bytes(st, key, b"pwned")
        with pytest.raises(UnsafeKey):
            st.open_writer(key, 5)
    with pytest.raises(UnsafeKey):
        st.delete("evil/victim")
    assert sorted(os.listdir(outside)) == ["victim"]  # no file, no "sub" directory
    assert (outside / "victim").read_bytes() == b"precious"

    # a symlinked directory that stays inside the root is fine
    (fs.dir / "real").mkdir()
    (fs.dir / "inner").symlink_to("real")
    put_bytes(st, "inner/ok", b"fine")
    assert (fs.dir / "real" / "ok").read_bytes() == b"fine"


def test_file_in_the_way_of_a_directory(fs: FS) -> None:
    st = fs.open()
    put_bytes(st, "f", b"file")
    with pytest.raises(StorageError) as err:
        put_bytes(st, "f/x", b"child")
    assert err.value.code == "PathConflict"
    assert "f is a file" in str(err.value)
    (fs.dir / "d").mkdir()
    (fs.dir / "d" / "inside").write_bytes(b"")
    with pytest.raises(StorageError) as err:
        put_bytes(st, "d", b"over a dir")
    assert err.value.code == "PathConflict"
    with pytest.raises(NotFound):
        st.head("d")
    with pytest.raises(NotFound):
        st.open("d")
    assert all_files(fs.dir) == ["d/inside", "f"]


# ---- atomic writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [3, 20])
def test_size_mismatch_leaves_no_temp_file(fs: FS, given: int) -> None:
    st = fs.open()
    put_bytes(st, "d/keep", b"original")
    with pytest.raises(StorageError) as err:
        st.put("d/keep", io.BytesIO(b"0123456789"), given)
    assert err.value.code == "SIZE_NOT_MATCH"
    with pytest.raises(StorageError):
        st.put("d/new", io.BytesIO(b"0123456789"), given)
    assert all_files(fs.dir) == ["d/keep"]
    assert (fs.dir / "d" / "keep").read_bytes() == b"original"


def test_put_sets_mode_and_mtime_and_delete_prunes_dirs(fs: FS) -> None:
    st = fs.open()
    put_bytes(st, "p/q/r", b"data", mtime=1_234_567_890.0, mode=0o640)
    e = st.head("p/q/r")
    assert (e.size, int(e.mtime), e.mode) == (4, 1_234_567_890, 0o640)
    assert (fs.dir / "p/q/r").stat().st_mode & 0o777 == 0o640
    noperm = fs.open(keep_perms=False)
    put_bytes(noperm, "p/s", b"x", mode=0o600)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (fs.dir / "p/s").stat().st_mode & 0o777 == 0o666 & ~umask  # --noperms: the default mode
    st.delete("p/q/r")
    st.delete("p/s")
    st.delete("p/s")  # missing is fine
    assert fs.dir.is_dir() and os.listdir(fs.dir) == []
    with pytest.raises(NotFound):
        st.head("p/q/r")


def test_ranged_reads(fs: FS) -> None:
    st = fs.open()
    data = os.urandom(2 * 1024 * 1024 + 77)
    put_bytes(st, "blob", data)
    assert read_all(st, "blob") == data
    for start, end in [(0, 1), (1, 70000), (65536, 65536 * 3 + 5), (len(data) - 5, None), (len(data), None)]:
        assert read_all(st, "blob", start, end) == data[start:end], (start, end)
    with st.open("blob", 10, 1000) as f:
        got = bytearray()
        while chunk := f.read(7):
            got += chunk
    assert bytes(got) == data[10:1000]


def test_local_kernel_copy_gives_equal_bytes(backend_factory: Callable[[str], Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src_fs, dst_fs = make_fs(backend_factory, "local"), make_fs(backend_factory, "local")
    src, dst = src_fs.open(), dst_fs.open()
    assert isinstance(dst, LocalStorage)
    data = os.urandom(5 * 1024 * 1024 + 123)
    put_bytes(src, "big", data)
    calls: list[int] = []
    real = os.copy_file_range

    def spy(*args: Any, **kw: Any) -> int:
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(os, "copy_file_range", spy)
    with src.open("big") as f:
        dst.put("copy", f, len(data), mtime=1_500_000_000.0)
    assert calls, "the whole-file reader should go through copy_file_range"
    assert (dst_fs.dir / "copy").read_bytes() == data

    # a partly consumed buffered file: its fd offset is ahead, so the read loop must be used
    calls.clear()
    with open(src_fs.dir / "big", "rb") as f:
        f.read(10)
        dst.put("tail", f, len(data) - 10)
    assert not calls
    assert (dst_fs.dir / "tail").read_bytes() == data[10:]

    # ranged readers expose no fd
    with src.open("big", 100, 200_000) as f:
        with pytest.raises(OSError):
            f.fileno()
        dst.put("range", f, 199_900)
    assert (dst_fs.dir / "range").read_bytes() == data[100:200_000]

    # the kernel path still checks the size exactly, both ways
    for wrong in (len(data) - 1, len(data) + 1):
        with src.open("big") as f, pytest.raises(StorageError) as err:
            dst.put("wrong", f, wrong)
        assert err.value.code == "SIZE_NOT_MATCH"
    assert all_files(dst_fs.dir) == ["copy", "range", "tail"]


def test_open_writer_parallel_write_at(fs: FS) -> None:
    st = fs.open()
    block = 65536
    data = os.urandom(32 * block + 5)
    w = st.open_writer("w/out.bin", len(data))
    offsets = list(range(0, len(data), block))

    def write_every_fourth(first: int) -> None:
        for off in offsets[first::4]:
            w.write_at(off, data[off : off + block])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write_every_fourth, range(4)))
    assert list(st.list()) == [], "nothing visible before commit"
    assert len(all_files(fs.dir)) == 1  # the hidden temp file
    w.commit(mtime=1_500_000_000.0, mode=0o600)
    assert (fs.dir / "w" / "out.bin").read_bytes() == data
    e = st.head("w/out.bin")
    assert (e.size, int(e.mtime), e.mode) == (len(data), 1_500_000_000, 0o600)
    with pytest.raises(StorageError):
        w.write_at(0, b"late")

    w2 = st.open_writer("w/aborted", 10)
    w2.write_at(0, b"0123456789")
    w2.abort()
    w2.abort()
    assert all_files(fs.dir) == ["w/out.bin"]


def test_parallel_puts_share_parents(fs: FS) -> None:
    """Threads creating the same directories at once (mkdir races) all succeed."""
    st = fs.open()
    keys = [f"x/y/{i % 3}/f{i}" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: put_bytes(st, k, k.encode()), keys))
    assert [e.key for e in st.list()] == byte_sorted(keys)
    assert all(read_all(st, k) == k.encode() for k in keys)


# ---- SFTP login -------------------------------------------------------------------------------


def test_sftp_wrong_key_is_a_clear_access_denied(sftp_fs: FS, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    st = sftp_fs.open(env={**sftp_fs.backend.env(), "SSH_PRIVATE_KEY_PATH": str(wrong)})
    with caplog.at_level(logging.INFO), pytest.raises(StorageError) as err:
        list(st.list())
    e = err.value
    assert e.code == "AccessDenied" and not e.retryable
    msg = str(e)
    assert f"{sftp_fs.backend.handle.user}@127.0.0.1" in msg and "SSH_PRIVATE_KEY_PATH" in msg
    assert "\n" not in msg
    assert e.__cause__ is None and e.__suppress_context__  # no paramiko traceback chained on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_sftp_password_never_shown(sftp_fs: FS, caplog: pytest.LogCaptureFixture) -> None:
    h = sftp_fs.backend.handle
    address = f"{h.user}:s3cr3t-pw@127.0.0.1:{h.port}:{sftp_fs.dir}/"
    st = sftp_fs.open(env={"SSH_KNOWN_HOSTS": sftp_fs.backend.env()["SSH_KNOWN_HOSTS"]}, address=address)
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as err:
        st.head("x")
    assert err.value.code == "AccessDenied"  # the test server takes keys only
    assert "s3cr3t-pw" not in str(err.value) + st.describe() + caplog.text


def test_sftp_bad_key_file(sftp_fs: FS, tmp_path: Path) -> None:
    (tmp_path / "garbage").write_text("not a key")
    for path, needle in [(tmp_path / "absent", "cannot read"), (tmp_path / "garbage", "not a private key")]:
        st = sftp_fs.open(env={"SSH_PRIVATE_KEY_PATH": str(path)})
        with pytest.raises(StorageError) as err:
            st.head("x")
        assert err.value.code == "InvalidArgument" and needle in str(err.value)


def test_sftp_changed_host_key_is_refused(sftp_fs: FS, tmp_path: Path) -> None:
    h = sftp_fs.backend.handle
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    env = {**sftp_fs.backend.env(), "SSH_KNOWN_HOSTS": str(known)}

    known.write_text(f"[127.0.0.1]:{h.port} {other.with_suffix('.pub').read_text()}")
    for trust in (False, True):  # --trust-new-hosts records new keys, never replaces a known one
        with pytest.raises(StorageError) as err:
            sftp_fs.open(env=env, trust_new_hosts=trust).head("x")
        assert err.value.code == "HostKeyMismatch" and "ssh-keygen -R" in str(err.value)

    real = (h.tmp / "host_ed25519.pub").read_text()
    known.write_text(f"[127.0.0.1]:{h.port} {real}")
    put_bytes(sftp_fs.open(env=env), "ok", b"trusted")
    assert (sftp_fs.dir / "ok").read_bytes() == b"trusted"


def test_sftp_threads_get_their_own_channels(sftp_fs: FS) -> None:
    st = sftp_fs.open()
    put_bytes(st, "k", b"v")
    n = 12
    all_alive = threading.Barrier(n, timeout=30)
    seen: set[int] = set()
    lock = threading.Lock()

    def use() -> None:
        client = st._sftp()  # type: ignore[attr-defined]
        assert read_all(st, "k") == b"v"
        with lock:
            seen.add(id(client))
        all_alive.wait()

    threads = [threading.Thread(target=use) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen) == n
    # more threads than OpenSSH's MaxSessions (10) per connection: a second connection was opened
    assert len(st._conns) == 2  # type: ignore[attr-defined]
    # the channels of ended threads are closed when the next channel is opened
    late = threading.Thread(target=st._sftp)  # type: ignore[attr-defined]
    late.start()
    late.join(30)
    assert len(st._clients) == 2  # type: ignore[attr-defined]  # the main thread's and the late one's


def test_sftp_reconnects_after_the_connection_drops(sftp_fs: FS) -> None:
    st = sftp_fs.open()
    put_bytes(st, "k", b"before")
    for conn in st._conns:  # type: ignore[attr-defined]
        conn.ssh.get_transport().close()
    assert read_all(st, "k") == b"before"
    put_bytes(st, "k", b"after")
    assert (sftp_fs.dir / "k").read_bytes() == b"after"
