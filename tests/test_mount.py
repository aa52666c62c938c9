"""`ossimport mount`: real FUSE mounts (libfuse 3 through mfusepy) over real servers (moto S3 and the
OSS shim), driven by the real CLI in its own process, read and written with plain file calls."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, tree

from ossimport.errors import NotFound
from ossimport.mount.command import alive, mounted

MiB = 1024 * 1024
OBJECT_BACKENDS = ["s3-moto", "s3-ceph", "oss"]


def _fuse_missing() -> str | None:
    import ctypes.util
    import shutil

    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed (Debian package fuse3)"
    if not ctypes.util.find_library("fuse3"):
        return "libfuse3 is not installed (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        return "mfusepy is not installed"
    except OSError as exc:
        return f"mfusepy cannot load libfuse: {exc}"
    return None


@pytest.fixture(autouse=True)
def fuse_available() -> None:
    why = _fuse_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FUSE is required under CI=true: {why}")
        pytest.skip(f"FUSE not usable here: {why}")


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _state_of(mountpoint: Path, env: dict[str, str]) -> str:
    """The mount's state directory as the mount process computes it (under env's XDG_CACHE_HOME)."""
    from ossimport.mount.command import state_dir

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    try:
        return state_dir(str(mountpoint))
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old


class Mount:
    """`ossimport mount` of one backend root at a fresh directory; `umount` on exit."""

    def __init__(self, backend: Any, root: str, tmp: Path, *extra: str) -> None:
        self.backend = backend
        self.root = root
        self.path = Path(tempfile.mkdtemp(prefix="mnt-", dir=tmp))
        self.env = {**backend.env(), "XDG_CACHE_HOME": str(tmp / "cache")}
        self.extra = extra
        self.pid: int | None = None

    def __enter__(self) -> Mount:
        proc = run_cli("mount", *self.extra, self.backend.address(self.root), str(self.path), env=self.env,
                       timeout=120)
        assert proc.returncode == 0, f"mount failed ({proc.returncode}): {proc.stderr}"
        assert mounted(str(self.path))
        self.state = _state_of(self.path, self.env)
        self.pid = int(Path(self.state, "pid").read_text())
        return self

    def umount(self) -> subprocess.CompletedProcess[str]:
        return run_cli("umount", str(self.path), env=self.env, timeout=120)

    def __exit__(self, *exc: object) -> None:
        if mounted(str(self.path)):
            proc = self.umount()
            if proc.returncode != 0:  # leave nothing behind even when a test failed half way
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        if self.pid and alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)

    def log(self) -> str:
        try:
            return Path(self.state, "mount.log").read_text(errors="replace")
        except OSError:
            return ""


def _walk(top: Path) -> dict[str, bytes]:
    found = {}
    for dirpath, _, files in os.walk(top):
        for name in files:
            p = Path(dirpath, name)
            found[str(p.relative_to(top))] = p.read_bytes()
    return found


# ---- reads --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OBJECT_BACKENDS)
def test_mounted_tree_reads_back_exactly(backend_factory: Any, tmp_path: Path, name: str) -> None:
    b = backend_factory(name)
    root = b.new_root()
    files = tree(big=3 * MiB + 17)
    b.seed(root, files)
    st = b.storage(root)
    st.put("made-by-console/", io.BytesIO(b""), 0)  # a directory that only a marker names
    with Mount(b, root, tmp_path) as m:
        # the long-lived mount process shows no key to `ps`
        from ossimport.address import parse_address

        cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes().decode()
        secret = parse_address(b.address(root)).secret_key
        assert secret not in cmdline and b.address(root).split("@")[0] not in cmdline, cmdline
        if os.geteuid() == 0:  # the kernel reads ahead (and asks the mount) 1 MiB at a time
            dev = os.stat(m.path).st_dev
            ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            _wait(lambda: ra.read_text().strip() == "1024", "the kernel's read-ahead to be 1 MiB")
        assert _walk(m.path) == files
        assert sorted(os.listdir(m.path)) == sorted({k.split("/")[0] for k in files} | {"made-by-console"})
        assert os.listdir(m.path / "made-by-console") == []
        assert os.path.getsize(m.path / "large/blob.bin") == len(files["large/blob.bin"])
        assert os.stat(m.path / "large/blob.bin").st_blksize == MiB  # cp and friends move 1 MiB a call
        # reads at offsets (random access) return the exact bytes
        data = files["large/blob.bin"]
        rnd = random.Random(7)
        with open(m.path / "large/blob.bin", "rb", buffering=0) as f:
            for _ in range(30):
                off = rnd.randrange(len(data))
                n = rnd.choice([1, 4096, 100_000, MiB])
                f.seek(off)
                assert f.read(n) == data[off:off + n]
        assert not (m.path / "nope").exists()
        with pytest.raises(FileNotFoundError):
            open(m.path / "a/nope.txt", "rb")


def test_large_file_sequential_random_and_concurrent_reads(backend_factory: Any, tmp_path: Path) -> None:
    b = backend_factory("s3-moto")
    root = b.new_root()
    data = random.Random(3).randbytes(40 * MiB + 5)
    b.seed(root, {"big.bin": data})
    with Mount(b, root, tmp_path) as m:
        path = m.path / "big.bin"
        assert hashlib.md5(path.read_bytes()).hexdigest() == hashlib.md5(data).hexdigest()
        # several reader processes at once, one sequential and two at random offsets
        script = (
            "import sys, random, hashlib\n"
            "p, mode, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])\n"
            "f = open(p, 'rb', buffering=0)\n"
            "if mode == 'seq':\n"
            "    h = hashlib.md5()\n"
            "    while c := f.read(1 << 20): h.update(c)\n"
            "    print(h.hexdigest())\n"
            "else:\n"
            "    r = random.Random(seed); out = hashlib.md5()\n"
            "    for _ in range(40):\n"
            "        off = r.randrange(size); f.seek(off); out.update(f.read(65536))\n"
            "    print(out.hexdigest())\n"
        )
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path), mode, str(seed), str(len(data))],
                                  stdout=subprocess.PIPE, text=True)
                 for mode, seed in (("seq", 0), ("rand", 1), ("rand", 2))]
        outs = [p.communicate(timeout=300)[0].strip() for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert outs[0] == hashlib.md5(data).hexdigest()
        for seed, got in zip((1, 2), outs[1:], strict=True):
            r, want = random.Random(seed), hashlib.md5()
            for _ in range(40):
                off = r.randrange(len(data))
                want.update(data[off:off + 65536])
            assert got == want.hexdigest()


def test_reader_widens_window_when_sequential_and_fetches_nothing_ahead_when_random(
        backend_factory: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ossimport.mount.readahead import MemoryBudget, Reader

    b = backend_factory("s3-moto")
    root = b.new_root()
    data = random.Random(5).randbytes(24 * MiB)
    b.seed(root, {"f": data})
    st = b.storage(root)
    budget = MemoryBudget(16 * MiB)
    with ThreadPoolExecutor(8) as pool:
        seq = Reader(st, "f", len(data), pool, budget, max_window=8 * MiB)
        got = b"".join(seq.read(off, 128 * 1024) for off in range(0, len(data), 128 * 1024))
        assert got == data
        # 1 MiB, then doubling to 8 MiB windows in 2 MiB blocks: far fewer GETs than 1 MiB each
        assert seq.gets <= 16, seq.gets
        assert budget.peak <= budget.limit
        seq.close()
        assert budget.used == 0
        rnd = Reader(st, "f", len(data), pool, budget)
        r = random.Random(9)
        for _ in range(20):
            off = r.randrange(1, len(data))
            assert rnd.read(off, 4096) == data[off:off + 4096]
        assert rnd.gets == 20  # exactly one ranged GET per random read, nothing fetched ahead
        assert budget.used == 0


def test_many_sequential_readers_share_the_read_ahead_budget(backend_factory: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ossimport.mount.readahead import MemoryBudget, Reader

    b = backend_factory("s3-moto")
    root = b.new_root()
    files = {f"shard{i}.tar": random.Random(i).randbytes(8 * MiB) for i in range(8)}
    b.seed(root, files)
    st = b.storage(root)
    budget = MemoryBudget(16 * MiB)  # much less than 8 files x 64 MiB windows
    with ThreadPoolExecutor(16) as pool, ThreadPoolExecutor(8) as readers:
        opened = {k: Reader(st, k, len(v), pool, budget) for k, v in files.items()}

        def read_all(key: str) -> bytes:
            r = opened[key]
            return b"".join(r.read(off, 128 * 1024) for off in range(0, r.size, 128 * 1024))

        got = dict(zip(files, readers.map(read_all, files), strict=True))
        assert got == files
        assert budget.peak <= budget.limit
        # each file kept streaming in blocks: not one 128 KiB GET per read (64 per file) once the
        # budget ran short
        gets = sorted(r.gets for r in opened.values())
        assert sum(gets) <= 8 * 16, gets
        for r in opened.values():
            r.close()
    assert budget.used == 0 and budget.streams == 0


def test_listing_a_large_directory_is_complete(backend_factory: Any, tmp_path: Path) -> None:
    b = backend_factory("s3-moto")
    root = b.new_root()
    names = {f"img{i:05d}.jpg": i.to_bytes(4, "big") for i in range(1_250)}  # more than one 1000-key page
    names["sub/inner.txt"] = b"x"
    b.seed(root, {f"d/{k}": v for k, v in names.items()})
    with Mount(b, root, tmp_path) as m:
        listed = os.listdir(m.path / "d")
        assert len(listed) == 1_251
        assert set(listed) == {k for k in names if "/" not in k} | {"sub"}
        with os.scandir(m.path / "d") as it:
            kinds = {e.name: e.is_dir() for e in it}
        assert kinds["sub"] is True and kinds["img00000.jpg"] is False
        assert (m.path / "d/img01249.jpg").read_bytes() == (1249).to_bytes(4, "big")


def test_killed_reader_leaves_the_mount_working(backend_factory: Any, tmp_path: Path) -> None:
    b = backend_factory("s3-moto")
    root = b.new_root()
    data = random.Random(4).randbytes(30 * MiB)
    b.seed(root, {"big.bin": data})
    with Mount(b, root, tmp_path) as m:
        reader = subprocess.Popen(
            [sys.executable, "-c",
             "import sys\nf = open(sys.argv[1], 'rb', buffering=0)\nf.read(1 << 20)\n"
             "print('reading', flush=True)\nwhile f.read(1 << 16): pass\n", str(m.path / "big.bin")],
            stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        reader.kill()  # mid-read, with read-ahead in flight
        reader.wait(timeout=30)
        assert m.pid is not None and alive(m.pid)
        assert (m.path / "big.bin").read_bytes() == data
        assert sorted(os.listdir(m.path)) == ["big.bin"]


class _Via:
    """A backend reached through a FaultProxy: same server, the proxy's port in the address."""

    def __init__(self, backend: Any, proxy: Any) -> None:
        self.backend, self.proxy = backend, proxy

    def address(self, root: str) -> str:
        return self.backend.address(root).replace(f":{self.backend.handle.port}/", f":{self.proxy.port}/")

    def env(self) -> dict[str, str]:
        return self.backend.env()


def test_rewrite_is_one_upload_and_reads_survive_broken_connections(backend_factory: Any,
                                                                    tmp_path: Path) -> None:
    from servers.faultproxy import Fault, FaultProxy

    b = backend_factory("s3-moto")
    root = b.new_root()
    data = random.Random(8).randbytes(6 * MiB)
    b.seed(root, {"old.txt": b"old content", "big.bin": data, "flaky.txt": b"flaky"})
    st = b.storage(root)
    with FaultProxy("127.0.0.1", b.handle.port) as proxy, Mount(_Via(b, proxy), root, tmp_path) as m:
        # a shell's `>` over an existing file (open O_TRUNC, dup2 to stdout, close the first
        # descriptor, write): one PUT of the new bytes, never an empty object in between
        assert (m.path / "old.txt").read_bytes() == b"old content"  # twice: its pages may be kept
        assert (m.path / "old.txt").read_bytes() == b"old content"
        proxy.reset_counters()
        subprocess.run(["sh", "-c", 'echo new > "$0"', str(m.path / "old.txt")], check=True)
        puts = [r for r in proxy.records if r.method == "PUT" and r.path.endswith("/old.txt")]
        assert len(puts) == 1, [(r.method, r.path) for r in puts]
        assert _read(st, "old.txt") == b"new\n"
        assert (m.path / "old.txt").read_bytes() == b"new\n"  # not the kept pages of the old object
        # ranged GETs cut off half way are fetched again: the bytes still come out exact
        proxy.add(Fault("reset_mid", count=3, method="GET", path=r"/big\.bin$"))
        assert (m.path / "big.bin").read_bytes() == data
        assert proxy.injected["reset_mid"] == 3
        # a store that keeps failing: the read fails with EIO after its retries, the mount lives on
        proxy.add(Fault("internal_error", probability=1.0, method="GET", path=r"/flaky\.txt$"))
        assert _errno(lambda: (m.path / "flaky.txt").read_bytes()) == errno.EIO
        proxy.clear()
        assert (m.path / "flaky.txt").read_bytes() == b"flaky"
        # read again, unchanged: served from the kernel's page cache, no request at all. (Read once
        # cleanly first: pages of the read cut off by resets above need not all have been kept.)
        assert (m.path / "big.bin").read_bytes() == data
        proxy.reset_counters()
        assert (m.path / "big.bin").read_bytes() == data
        assert [r for r in proxy.records if r.method == "GET"] == []


# ---- writes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OBJECT_BACKENDS)
def test_write_rename_unlink_mkdir_rmdir_round_trip(backend_factory: Any, tmp_path: Path, name: str) -> None:
    b = backend_factory(name)
    root = b.new_root()
    b.seed(root, {"keep/old.txt": b"old"})
    st = b.storage(root)
    # above the 16 MiB multipart threshold; 100 MiB once (moto), smaller where the server is slow
    big = random.Random(6).randbytes((100 if name == "s3-moto" else 20) * MiB + 3)
    local = tmp_path / "big.bin"
    local.write_bytes(big)
    with Mount(b, root, tmp_path) as m:
        # cp in: uploaded on close, verified, byte-identical in the store
        subprocess.run(["cp", str(local), str(m.path / "in.bin")], check=True)
        assert st.head("in.bin").size == len(big)
        with st.open("in.bin") as f:
            assert f.read() == big
        # cp out: byte-identical
        subprocess.run(["cp", str(m.path / "in.bin"), str(tmp_path / "out.bin")], check=True)
        assert (tmp_path / "out.bin").read_bytes() == big
        # a small file written with several writes, then rewritten whole (O_TRUNC); while it is
        # open it is listed (the store has it only after close)
        with open(m.path / "keep/new.txt", "wb") as f:
            f.write(b"hello ")
            f.flush()
            assert "new.txt" in os.listdir(m.path / "keep")
            f.write(b"world")
        assert _read(st, "keep/new.txt") == b"hello world"
        (m.path / "keep/old.txt").write_bytes(b"replaced")
        assert _read(st, "keep/old.txt") == b"replaced"
        # rename of a file: server-side copy, then the old key is gone
        os.rename(m.path / "in.bin", m.path / "keep/moved.bin")
        with pytest.raises(NotFound):
            st.head("in.bin")
        assert st.head("keep/moved.bin").size == len(big)
        assert sorted(os.listdir(m.path / "keep")) == ["moved.bin", "new.txt", "old.txt"]
        # unlink
        os.unlink(m.path / "keep/moved.bin")
        with pytest.raises(NotFound):
            st.head("keep/moved.bin")
        assert not (m.path / "keep/moved.bin").exists()
        # mkdir makes a lasting (marker) directory; rmdir of an empty one removes it
        os.mkdir(m.path / "newdir")
        assert st.head("newdir/").size == 0
        assert (m.path / "newdir").is_dir() and os.listdir(m.path / "newdir") == []
        (m.path / "newdir/f.txt").write_bytes(b"f")
        with pytest.raises(OSError) as exc:
            os.rmdir(m.path / "newdir")
        assert exc.value.errno == errno.ENOTEMPTY
        os.unlink(m.path / "newdir/f.txt")
        os.rmdir(m.path / "newdir")
        with pytest.raises(NotFound):
            st.head("newdir/")
        assert "newdir" not in os.listdir(m.path)


def _read(st: Any, key: str) -> bytes:
    with st.open(key) as f:
        return f.read()


def _errno(fn: Any) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


def test_what_a_store_cannot_do_fails_at_once_with_its_errno(backend_factory: Any, tmp_path: Path) -> None:
    b = backend_factory("s3-moto")
    root = b.new_root()
    b.seed(root, {"f.txt": b"content", "d/g.txt": b"g"})
    st = b.storage(root)
    with Mount(b, root, tmp_path) as m:
        f = m.path / "f.txt"
        assert _errno(lambda: os.link(f, m.path / "hard")) == errno.EPERM
        assert _errno(lambda: os.symlink("f.txt", m.path / "soft")) == errno.EPERM
        assert _errno(lambda: open(f, "ab")) == errno.EOPNOTSUPP  # append without rewriting
        assert _errno(lambda: open(f, "r+b")) == errno.EOPNOTSUPP  # in-place edit
        assert _errno(lambda: os.truncate(f, 3)) == errno.EOPNOTSUPP
        assert _errno(lambda: os.chmod(f, 0o600)) == errno.EPERM
        assert _errno(lambda: os.rename(m.path / "d", m.path / "e")) == errno.EXDEV
        assert _errno(lambda: os.rmdir(m.path / "d")) == errno.ENOTEMPTY
        assert _errno(lambda: os.unlink(m.path / "d")) == errno.EISDIR
        os.chmod(f, 0o644)  # what is shown: a no-op
        assert _read(st, "f.txt") == b"content"  # nothing above touched it
        assert _read(st, "d/g.txt") == b"g"
    with Mount(b, root, tmp_path, "--read-only", "--allow-other") as m:
        options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                       if line.split()[1] == str(m.path))
        assert "ro" in options.split(",") and "allow_other" in options.split(","), options
        assert (m.path / "f.txt").read_bytes() == b"content"
        assert _errno(lambda: open(m.path / "new.txt", "wb")) == errno.EROFS
        assert _errno(lambda: os.unlink(m.path / "f.txt")) == errno.EROFS
        assert _errno(lambda: os.mkdir(m.path / "x")) == errno.EROFS
    assert sorted(k.key for k in st.list()) == ["d/g.txt", "f.txt"]


# ---- life cycle ---------------------------------------------------------------------------------------
def test_umount_and_sigterm_upload_pending_writes_and_leave_no_process(backend_factory: Any,
                                                                       tmp_path: Path) -> None:
    b = backend_factory("s3-moto")
    root = b.new_root()
    b.seed(root, {"a.txt": b"a"})
    st = b.storage(root)
    with Mount(b, root, tmp_path) as m:
        # busy: a process has a file open there; umount says so and leaves the mount working
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys\nf = open(sys.argv[1], 'rb')\nprint('open', flush=True)\n"
             "sys.stdin.read()\n", str(m.path / "a.txt")],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        proc = m.umount()
        assert proc.returncode == 1 and "busy" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert (m.path / "a.txt").read_bytes() == b"a"
        holder.communicate("", timeout=30)
        proc = m.umount()
        assert proc.returncode == 0, proc.stderr
        assert not mounted(str(m.path))
        assert m.pid is not None and not alive(m.pid)
    with Mount(b, root, tmp_path) as m:
        # a writer holds a file open with bytes not yet uploaded; the mount is told to stop
        writer = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time\nf = open(sys.argv[1], 'wb')\nf.write(b'pending bytes')\nf.flush()\n"
             "print('written', flush=True)\nsys.stdin.read()\n", str(m.path / "pending.txt")],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
            assert m.pid is not None
            os.kill(m.pid, signal.SIGTERM)
            _wait(lambda: not alive(m.pid), "the mount process to exit after SIGTERM")
            assert _read(st, "pending.txt") == b"pending bytes"
            assert not mounted(str(m.path))
        finally:
            writer.kill()
            writer.wait(timeout=30)


def test_mount_errors_are_one_line_before_daemonising(backend_factory: Any, tmp_path: Path) -> None:
    moto, oss = backend_factory("s3-moto"), backend_factory("oss")
    mp = tmp_path / "mp"
    mp.mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    good = moto.address(moto.new_root())
    cases = {
        "bad address": ("ftp://x/y", "unknown storage type"),
        "not a bucket": (str(tmp_path), "is not a bucket"),
        "missing bucket": (good.replace("@ossimport-test.", "@no-such-bucket-x."), "does not exist"),
        "wrong keys": (oss.address("r").replace(":OSSSECRET5678@", ":WRONGSECRET99@"), "cannot mount"),
        "missing mount point": (good, "does not exist"),
    }
    for what, (address, words) in cases.items():
        target = tmp_path / "absent" if what == "missing mount point" else mp
        proc = run_cli("mount", address, str(target), env=env, timeout=120)
        assert proc.returncode == 2, (what, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (what, proc.stderr)
        assert "WRONGSECRET99" not in proc.stderr and "Traceback" not in proc.stderr
        assert not mounted(str(mp))
    with Mount(moto, moto.new_root(), tmp_path) as m:  # busy: mounted already
        proc = run_cli("mount", good, str(m.path), env=env, timeout=120)
        assert proc.returncode == 2 and "busy" in proc.stderr, proc.stderr
    # busy: another mount process for this mount point is starting (it holds the state lock)
    import fcntl

    state = _state_of(mp, env)
    os.makedirs(state, exist_ok=True)
    with open(os.path.join(state, "lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run_cli("mount", good, str(mp), env=env, timeout=120)
    assert proc.returncode == 2 and "another ossimport mount is starting" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not mounted(str(mp))
    # no /dev/fuse: in a private mount namespace whose /dev is an empty tmpfs
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /dev && exec "$0" -m ossimport mount "$1" "$2"', sys.executable, good, str(mp)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr.split("\n")[0][:80]:
        pytest.skip(f"cannot make a mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert "/dev/fuse does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["s3-moto", "oss", "local"])
def test_list_level_shows_one_level_with_marker_only_directories(backend_factory: Any, name: str) -> None:
    b = backend_factory(name)
    root = b.new_root()
    b.seed(root, {"a.txt": b"1", "d/x.txt": b"22", "d/e/y.txt": b"3", "z/w.txt": b"4"})
    st = b.storage(root)
    if name != "local":
        st.put("m/", io.BytesIO(b""), 0)
        st.put("d/", io.BytesIO(b""), 0)
    got = {e.key: e.size for e in st.list_level("")}
    want = {"a.txt": 1, "d/": 0, "z/": 0} | ({} if name == "local" else {"m/": 0})
    assert got == want
    assert {e.key: e.size for e in st.list_level("d/")} == {"d/x.txt": 2, "d/e/": 0}
    # a bounded question ("anything in d/?") is answered past d/'s own marker
    assert len(list(st.list_level("d/", limit=1))) == 1
    assert len(list(st.list_level("", limit=2))) == 2
    if name != "local":
        assert list(st.list_level("m/", limit=1)) == []  # only a marker: empty
    assert list(st.list_level("nothing/")) == []


def test_metadata_caches_stay_within_their_bounds(backend_factory: Any, monkeypatch: Any) -> None:
    from ossimport.mount import meta

    b = backend_factory("s3-moto")
    root = b.new_root()
    b.seed(root, {f"d{d}/f{i}": b"x" * i for d in range(3) for i in range(5)})
    monkeypatch.setattr(meta, "MAX_ATTRS", 6)
    monkeypatch.setattr(meta, "MAX_LISTED", 11)
    ns = meta.Namespace(b.storage(root), attr_ttl=60, dir_ttl=60)
    for d in range(3):
        for i in range(5):
            attr = ns.attr(f"d{d}/f{i}")
            assert attr is not None and attr.size == i
            assert len(ns._attrs) <= 6
    for d in range(3):
        assert sorted(name for name, _ in ns.listdir(f"d{d}")) == [f"f{i}" for i in range(5)]
    assert sorted(ns._dirs) == ["d1", "d2"]  # 15 names do not fit in 11: the oldest listing went
    assert ns.attr("d0/f3").size == 3  # answered again from the store


def test_a_killed_mount_process_is_unmounted_and_mounted_again(backend_factory: Any, tmp_path: Path) -> None:
    b = backend_factory("s3-moto")
    root = b.new_root()
    b.seed(root, {"a.txt": b"a"})
    with Mount(b, root, tmp_path) as m:
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)
        _wait(lambda: not alive(m.pid), "the killed mount process to go")
        with pytest.raises(OSError) as exc:
            os.listdir(m.path)
        # what the kernel says of a dead FUSE mount (ECONNABORTED while it tears the connection down)
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        proc = m.umount()
        assert proc.returncode == 0, proc.stderr
        assert not mounted(str(m.path))
        # the address as ads-cli users write it, the prefix without a trailing '/'
        again = run_cli("mount", b.address(root).rstrip("/"), str(m.path), env=m.env, timeout=120)
        assert again.returncode == 0, again.stderr
        assert (m.path / "a.txt").read_bytes() == b"a"
