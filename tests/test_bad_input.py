"""The bad-input corpus (issue 3): whatever a user or a store throws at ossimport, the answer is a
clear line, a non-zero exit, no traceback, and nothing written outside DST.

Bad input (an address, an option, a job config) is exit 2 and exactly one line
`ossimport: error: ...` naming the problem and the fix. A file that cannot be copied is exit 1 and
a `FAILED KEY: CODE: cause` line, and the other files are still copied. Every CLI run here happens
in its own process with the test's tmp dir as working directory (a mistyped address taken for a
relative local path must not land in the repository), and the whole tmp dir is listed before and
after to prove that nothing appeared outside DST.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import write_tree
from jobenv import JobEnv

from ossimport.address import parse_address
from ossimport.cli import main

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "ossimport: error: "


# ---- helpers -----------------------------------------------------------------------------------------
def run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
        user: str | None = None, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """`python -m ossimport ARGS` in `cwd` (never the repository), optionally as another user."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    argv = [python, "-m", "ossimport", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)


def snapshot(top: Path) -> set[str]:
    """Every path below `top` (files, directories, links; links not followed), relative."""
    out: set[str] = set()
    for d, dirs, files in os.walk(top):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(d, name), top))
    return out


def created_outside(before: set[str], after: set[str], dst: str | None) -> list[str]:
    """Paths that appeared and are not DST, inside it, or a directory on the way to it."""
    new = after - before
    if dst is None:
        return sorted(new)
    dst = dst.rstrip("/")
    return sorted(p for p in new if p != dst and not p.startswith(dst + "/") and not dst.startswith(p + "/"))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The --json summary (the last JSON line of stdout)."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return dict(json.loads(lines[-1]))


def failed_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(("FAILED ", "FAILED:"))]


def not_tried(proc: subprocess.CompletedProcess[str]) -> int:
    """The count of the CLI's "N more files were not tried" line (0 without one)."""
    for ln in proc.stderr.splitlines():
        if ln.startswith("ossimport: ") and "more files were not tried" in ln:
            return int(ln.split()[1])
    return 0


def files_under(top: Path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), top): Path(d, f).read_bytes()
            for d, _, fs in os.walk(top) for f in fs}


def byte_names(top: Path) -> set[bytes]:
    """Relative file names below `top` as the bytes the file system holds."""
    btop = os.fsencode(top)
    return {os.path.relpath(os.path.join(d, f), btop) for d, _, fs in os.walk(btop) for f in fs}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def s3_client(address: str) -> Any:
    import boto3

    loc = parse_address(address)
    return boto3.client("s3", endpoint_url=loc.endpoint_url(), aws_access_key_id=loc.access_key or "a",
                        aws_secret_access_key=loc.secret_key or "b", region_name="us-east-1")


def put_raw(address: str, files: dict[str, bytes]) -> None:
    """Objects under the address's prefix with exactly these keys (no check_key in the way)."""
    loc = parse_address(address)
    client = s3_client(address)
    for key, data in files.items():
        client.put_object(Bucket=loc.bucket, Key=loc.prefix + key, Body=data)


def raw_keys(address: str) -> dict[str, int]:
    """key (relative to the address's prefix) -> size, listed by boto3 itself."""
    loc = parse_address(address)
    client = s3_client(address)
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(loc.prefix):]] = obj["Size"]
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working directory with a small source tree in src/."""
    write_tree(tmp_path / "src", {"a.txt": b"alpha", "sub/b.txt": b"beta"})
    return tmp_path


# ---- invalid addresses ----------------------------------------------------------------------------------
BAD_ADDRESSES = [
    ("", "empty address"),
    ("s3:///p/", "has no bucket"),
    ("oss://.127.0.0.1:9000/p/", "has no bucket"),
    ("s3://bad!name.127.0.0.1:9000/p/", "'bad!name' is not a valid bucket name"),
    ("s3://bück.127.0.0.1:9000/p/", "'bück' is not a valid bucket name"),
    ("s3://b ucket.127.0.0.1:9000/p/", "'b ucket' is not a valid bucket name"),
    ("s3://-bucket.127.0.0.1:9000/p/", "'-bucket' is not a valid bucket name"),
    ("ftp://host/p/", "unknown storage type 'ftp'"),
    ("://x/", "unknown storage type ''"),
    ("s3://ak@b.127.0.0.1:9000/", "credentials must be ACCESS_KEY:SECRET_KEY"),
    ("s3://:sk@b.127.0.0.1:9000/", "credentials must be ACCESS_KEY:SECRET_KEY"),
    ("s3://a:b:c:d@b.127.0.0.1:9000/", "credentials must be ACCESS_KEY:SECRET_KEY"),
    ("s3://AKIDX:se/cret@b.127.0.0.1:9000/p/", "the secret key seems to contain '/'; escape it as %2F"),
    ("user:pa/ss@127.0.0.1:2222:/data/", "the password seems to contain '/'; escape it as %2F"),
    ("127.0.0.1:", "has no path after 'host:'"),
    ("user@127.0.0.1:2222:", "has no path after 'host:'"),
    ("user@127.0.0.1:99999:/data/", "SFTP port 99999 is out of range 1-65535"),
    ("user@127.0.0.1:0:/data/", "SFTP port 0 is out of range 1-65535"),
    ("u@[::1:22:/data/", "is not a valid SFTP address"),
    ("s3://b.127.0.0.1:99999/p/", "port 99999 is out of range 1-65535"),
    ("minio://127.0.0.1:99999/b/", "port 99999 is out of range 1-65535"),
    ("s3://b.127.0.0.1:abc/p/", "'127.0.0.1:abc' is not a valid endpoint"),
    ("s3://b.127.0.0.1:/p/", "'127.0.0.1:' is not a valid endpoint"),
    ("s3://b.127.0.0.1:1:2/p/", "'127.0.0.1:1:2' is not a valid endpoint"),
    ("s3://b.127.0.0.1 :9000/p/", "'127.0.0.1 :9000' is not a valid endpoint"),
    ("s3://b..127.0.0.1/p/", "'.127.0.0.1' is not a valid endpoint"),
    ("s3://b./p/", "has an empty endpoint after 'b.'"),  # was: the AWS default endpoint, over the network
    ("minio://127.0.0.1:9000/", "write minio://[AK:SK@]HOST:PORT/BUCKET"),
    ("list://", "list:// needs the path of a URL list file"),
    ("s3://b.127.0.0.1:9000/p%00x/", "address prefix contains a NUL character"),
]


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize(("address", "needle"), BAD_ADDRESSES, ids=[a or "<empty>" for a, _ in BAD_ADDRESSES])
def test_invalid_address_is_one_line(work: Path, address: str, needle: str, side: str) -> None:
    before = snapshot(work)
    args = ["cp", "src/", address] if side == "dst" else ["cp", address, "dst/"]
    line = assert_one_line_error(run(work, *args, timeout=30), needle)
    for secret in ("se/cret", "pa/ss"):
        assert secret not in line
    assert snapshot(work) == before, "a bad address writes nothing (no DST, no relative 'local' path)"


def test_http_destination_is_refused(work: Path) -> None:
    before = snapshot(work)
    assert_one_line_error(run(work, "cp", "src/", f"http://127.0.0.1:{closed_port()}/x/"), "read-only")
    assert snapshot(work) == before


@pytest.mark.parametrize("args", [
    ["cp", "src\x00evil/", "dst/"],
    ["cp", "src/", "dst\x00/"],
    ["sync", "s3://b.127.0.0.1:9000/p\x00/", "dst/"],
    ["verify", "src/", "user@127.0.0.1:/da\x00ta/"],
], ids=["local-src", "local-dst", "s3-prefix", "sftp-path"])
def test_nul_in_an_address_is_refused(work: Path, args: list[str], capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A NUL cannot pass through argv (execve cuts it), so this runs the CLI in-process."""
    monkeypatch.chdir(work)
    before = snapshot(work)
    code = main(args)
    out = capsys.readouterr()
    assert code == 2
    assert out.err.splitlines() == [f"{ERROR_PREFIX}address contains a NUL character"]
    assert snapshot(work) == before


def test_bad_option_values_are_one_line(work: Path) -> None:
    before = snapshot(work)
    for args, needle in ((["--connTimeout", "-1", "cp", "src/", "dst/"], "must not be negative"),
                         (["--part-size", "lots", "cp", "src/", "dst/"], "is not a size"),
                         (["--bwlimit", "fast", "cp", "src/", "dst/"], "is not a number"),
                         (["cp", "src/", "dst/", "extra/"], "unrecognized arguments"),
                         (["cp", "src", "dst/"], "is a directory"),
                         (["cp", "src/", "src/sub/"], "DST is inside SRC"),
                         (["cp", "src/", "./src/"], "SRC and DST are the same directory"),
                         (["verify", "src/a.txt", "dst/a.txt"], "verify compares two directories")):
        assert_one_line_error(run(work, *args), needle)
    assert snapshot(work) == before


@pytest.mark.parametrize("option", ["--timeout", "--connTimeout"])
def test_a_zero_timeout_is_refused(work: Path, option: str) -> None:
    """It used to become the default (120 s / 30 s) without a word."""
    before = snapshot(work)
    assert_one_line_error(run(work, option, "0", "cp", "src/", "dst/"), "a timeout must be more than 0 seconds")
    assert snapshot(work) == before


# ---- stores that say no ---------------------------------------------------------------------------------
def test_wrong_secret_on_ceph(work: Path, backend_factory: Any) -> None:
    ceph = backend_factory("s3-ceph")
    root = ceph.new_root()
    good = ceph.address(root)
    loc = parse_address(good)
    ceph.seed(root, {"remote.txt": b"remote"})
    wrong = f"s3://{loc.access_key}:WrongSecret%2F0000@{loc.bucket}.{loc.endpoint}/{root}/"
    before = snapshot(work)
    t0 = time.monotonic()
    up = run(work, "cp", "src/", wrong)
    down = run(work, "sync", wrong, "dst/")
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"credentials errors are not retried: {elapsed:.1f}s"
    assert up.returncode == 1 and "Traceback" not in up.stderr
    fails = failed_lines(up)
    # files in flight when the first failed are named; the rest are counted as not tried
    assert len(fails) + not_tried(up) == 2 and fails, up.stderr
    assert {ln.split(":", 1)[0] for ln in fails} <= {"FAILED a.txt", "FAILED sub/b.txt"}, up.stderr
    assert all(("SignatureDoesNotMatch" in ln or "AccessDenied" in ln) for ln in fails), up.stderr
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "SignatureDoesNotMatch" in down.stderr or "AccessDenied" in down.stderr, down.stderr
    assert created_outside(before, snapshot(work), "dst") == []
    assert not (work / "dst").exists() or files_under(work / "dst") == {}
    assert raw_keys(good) == {"remote.txt": 6}, "nothing was written with the wrong secret"
    for proc in (up, down):
        assert "WrongSecret" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("ak", "sk", "code"), [
    ("OSSAKID1234", "wrong-secret", "SignatureDoesNotMatch"),
    ("NOSUCHKEYID", "OSSSECRET5678", "InvalidAccessKeyId"),
])
def test_wrong_key_on_oss(work: Path, backend_factory: Any, ak: str, sk: str, code: str) -> None:
    oss = backend_factory("oss")
    root = oss.new_root()
    loc = parse_address(oss.address(root))
    addr = f"oss://{ak}:{sk}@{loc.bucket}.{loc.endpoint}/{root}/"
    before = snapshot(work)
    t0 = time.monotonic()
    up = run(work, "cp", "src/", addr)
    down = run(work, "sync", addr, "dst/")
    assert time.monotonic() - t0 < 60
    assert up.returncode == 1 and "Traceback" not in up.stderr
    fails = failed_lines(up)
    assert len(fails) == 1 and not_tried(up) == 1 and all(code in ln for ln in fails), up.stderr
    assert down.returncode == 1 and code in down.stderr and "Traceback" not in down.stderr
    assert created_outside(before, snapshot(work), "dst") == []
    assert sk not in up.stderr + down.stderr


def test_wrong_secret_gives_one_line_not_one_per_file(work: Path, backend_factory: Any) -> None:
    ceph = backend_factory("s3-ceph")
    root = ceph.new_root()
    loc = parse_address(ceph.address(root))
    wrong = f"s3://{loc.access_key}:WrongSecret%2F0000@{loc.bucket}.{loc.endpoint}/{root}/"
    many = work / "many"
    write_tree(many, {f"d{i % 7}/f{i:03d}.txt": b"x" * i for i in range(300)})
    t0 = time.monotonic()
    up = run(work, "--threads", "4", "--json", "cp", "many/", wrong)
    assert time.monotonic() - t0 < 60
    assert up.returncode == 1 and "Traceback" not in up.stderr
    fails = failed_lines(up)
    # the files in flight on the other threads when the first answer came back failed the same
    # way: they are counted with the files not tried, not printed (README: one FAILED line)
    assert len(fails) == 1 and all("SignatureDoesNotMatch" in ln for ln in fails), up.stderr
    assert not_tried(up) == 300 - len(fails), up.stderr
    summary = json.loads(up.stdout)
    assert summary["failed"] == 300 and summary["not_tried"] == 300 - len(fails) and summary["copied"] == 0
    assert "WrongSecret" not in up.stdout + up.stderr


def test_unreachable_endpoint_fails_within_a_bound(work: Path) -> None:
    port = closed_port()
    addr = f"s3://AKIDX:SECRETX@bucket.127.0.0.1:{port}/p/"
    before = snapshot(work)
    t0 = time.monotonic()
    up = run(work, "--connTimeout", "1", "--timeout", "2", "cp", "src/", addr, timeout=120)
    t_up = time.monotonic() - t0
    t0 = time.monotonic()
    down = run(work, "--connTimeout", "1", "--timeout", "2", "sync", addr, "dst/", timeout=120)
    t_down = time.monotonic() - t0
    check = run(work, "--connTimeout", "1", "verify", "src/", addr, timeout=120)
    # retries with backoff (botocore's 3 tries inside ossimport's 4), but bounded
    assert t_up < 60 and t_down < 60, (t_up, t_down)
    # the endpoint was never reached: one FAILED line, like a wrong key, and the rest not tried
    assert up.returncode == 1 and len(failed_lines(up)) == 1 and not_tried(up) == 1, up.stderr
    assert all("ConnectionRefused: " in ln and f"cannot reach http://127.0.0.1:{port}" in ln
               for ln in failed_lines(up)), up.stderr
    assert down.returncode == 1 and f"cannot reach http://127.0.0.1:{port}" in down.stderr
    assert check.returncode == 1, "a destination that cannot be listed is not 'identical'"
    for proc in (up, down, check):
        assert "Traceback" not in proc.stderr
    assert created_outside(before, snapshot(work), "dst") == []


@pytest.mark.parametrize("processes", ["1", "2"])
def test_an_endpoint_never_reached_fails_fast_with_one_line(work: Path, processes: str) -> None:
    """A mistyped endpoint (an unknown host, a closed port): retried as documented, then one
    FAILED line and one line counting the rest, however many threads and copy processes were
    trying at once; not one line (and a round of retries) per file."""
    many = work / "many"
    write_tree(many, {f"d{i % 7}/f{i:03d}.txt": b"x" * i for i in range(300)})
    for addr, code in ((f"s3://AKIDX:SECRETX@bucket.127.0.0.1:{closed_port()}/p/", "ConnectionRefused"),
                       ("s3://AKIDX:SECRETX@bucket.no-such-host.invalid:9000/p/", "UnknownHost")):
        up = run(work, "--json", "--threads", "8", "--processes", processes, "--connTimeout", "1", "--timeout", "2",
                 "cp", "many/", addr, timeout=120)
        fails = failed_lines(up)
        assert up.returncode == 1 and "Traceback" not in up.stderr
        assert len(fails) == 1 and f": {code}: " in fails[0], up.stderr
        assert not_tried(up) == 299 and summary(up)["failed"] == 300 and summary(up)["not_tried"] == 299


def test_missing_bucket_is_named(work: Path, backend_factory: Any) -> None:
    s3 = backend_factory("s3-moto")
    loc = parse_address(s3.address(s3.new_root()))
    addr = f"s3://{loc.access_key}:x@nosuchbucket-{os.getpid()}.{loc.endpoint}/p/"
    before = snapshot(work)
    up = run(work, "cp", "src/", addr)
    down = run(work, "sync", addr, "dst/")
    check = run(work, "--json", "verify", "src/", addr)
    assert up.returncode == 1 and len(failed_lines(up)) == 1 and not_tried(up) == 1, up.stderr
    assert all("NoSuchBucket" in ln and f"'nosuchbucket-{os.getpid()}' does not exist" in ln
               for ln in failed_lines(up)), up.stderr
    assert down.returncode == 1 and f"bucket 'nosuchbucket-{os.getpid()}' does not exist" in down.stderr
    # verify used to answer "0 errors" and exit 0 when the destination could not be listed at all
    assert check.returncode == 1, check.stdout + check.stderr
    assert summary(check)["errors"] == 1
    for proc in (up, down, check):
        assert "Traceback" not in proc.stderr
    assert created_outside(before, snapshot(work), "dst") == []


# ---- object keys a file system cannot take --------------------------------------------------------------
UNSAFE_KEYS = ["..", "../up.txt", "a/../../up2.txt", "/abs.txt", "a//b.txt", "./dot.txt", "a/./b.txt",
               "a/..", "..\\..\\win.txt", "back\\slash.txt", "x/../../../../../../tmp/escape3.txt"]


@pytest.mark.parametrize("dst_kind", ["local", "sftp"])
def test_unsafe_keys_are_refused_and_nothing_escapes(tmp_path: Path, backend_factory: Any, dst_kind: str) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    src_addr = s3.address(root)
    put_raw(src_addr, {"ok.txt": b"ok", **{k: b"evil" for k in UNSAFE_KEYS}})
    listed = raw_keys(src_addr)
    assert len(listed) == len(UNSAFE_KEYS) + 1
    if dst_kind == "local":
        watch = tmp_path
        dst_dir = tmp_path / "inner" / "dst"
        dst_addr = f"{dst_dir}/"
        env: dict[str, str] = {}
    else:
        sftp = backend_factory("sftp")
        sroot = sftp.new_root()
        dst_addr = sftp.address(sroot)  # creates the server-side directory
        dst_dir = Path(parse_address(dst_addr).path)
        watch = dst_dir.parent  # every other test root lives beside it: listed before and after
        env = sftp.env()
    before = snapshot(watch)
    proc = run(tmp_path, "cp", src_addr, dst_addr, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    fails = failed_lines(proc)
    assert len(fails) == len(UNSAFE_KEYS), proc.stderr
    assert all("InvalidObjectName" in ln for ln in fails), proc.stderr
    assert files_under(dst_dir) == {"ok.txt": b"ok"}
    rel = os.path.relpath(dst_dir, watch)
    assert created_outside(before, snapshot(watch), rel) == []
    assert not Path("/tmp/escape3.txt").exists()


def test_single_object_named_dotdot_is_refused(tmp_path: Path, backend_factory: Any) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    addr = s3.address(root)
    put_raw(addr, {"x/..": b"evil"})
    dst = tmp_path / "inner" / "dst"
    dst.mkdir(parents=True)
    before = snapshot(tmp_path)
    proc = run(tmp_path, "cp", addr + "x/..", f"{dst}/")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(failed_lines(proc)) == 1 and "InvalidObjectName" in failed_lines(proc)[0], proc.stderr
    assert snapshot(tmp_path) == before


def test_long_keys(tmp_path: Path, backend_factory: Any) -> None:
    """S3 takes keys of up to 1,024 bytes; a file system takes 255-byte names and 4,096-byte paths."""
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    addr = s3.address(root)
    prefix_len = len(parse_address(addr).prefix)
    room = 1024 - prefix_len  # bytes left for the relative key
    too_long_name = "n" * (room - len("long/"))  # one 1000-odd-byte segment: ENAMETOOLONG
    segments = "/".join(["s" * 200] * 5)  # 1,004 bytes in 200-byte segments: a legal path
    deep = (segments + "/" + "d" * (room - len(segments) - 1))
    keys = {"short.txt": b"short", f"long/{too_long_name}": b"too long", deep: b"deep"}
    assert len((parse_address(addr).prefix + f"long/{too_long_name}").encode()) == 1024
    assert len((parse_address(addr).prefix + deep).encode()) == 1024
    put_raw(addr, keys)
    dst = tmp_path / "dst"
    before = snapshot(tmp_path)
    proc = run(tmp_path, "cp", addr, f"{dst}/")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [fail] = failed_lines(proc)
    assert fail.startswith(f"FAILED long/{too_long_name}: ") and "File name too long" in fail, fail
    assert files_under(dst) == {"short.txt": b"short", deep: b"deep"}, "the others are still copied"
    assert created_outside(before, snapshot(tmp_path), "dst") == []
    assert not [p for p in snapshot(dst) if ".tmp" in p or "ossimport" in p], "no temporary file left"


# ---- names: unicode, case, specials, zero bytes, empty directories ------------------------------------
NFC = unicodedata.normalize("NFC", "café-ñ.txt")
NFD = unicodedata.normalize("NFD", "café-ñ.txt")
SPECIAL_NAMES = {
    "percent%41%2F%25.txt": b"percent",
    "plus+and space.txt": b"plus",
    "question?mark.txt": b"question",
    "hash#tag.txt": b"hash",
    "amp&eq=val.txt": b"amp",
    "emoji 😀 🚀.txt": b"emoji",
    "quote'\"`.txt": b"quotes",
    "tilde~!$()*,;[]{}.txt": b"punct",
    "dir with space/sub+dir/%2F#?.bin": b"nested",
    "README.md": b"upper",
    "readme.md": b"lower",
    "ReadMe.md": b"mixed",
    "Case/x.txt": b"dir upper",
    "case/x.txt": b"dir lower",
    NFC: b"composed",
    NFD: b"decomposed",
    "zero.bin": b"",
    "zdir/zero2.bin": b"",
}


@pytest.mark.parametrize("store", ["s3-moto", "s3-ceph", "oss"])
def test_names_round_trip_byte_exact(tmp_path: Path, backend_factory: Any, store: str) -> None:
    """local -> store -> local keeps every name byte for byte: NFC and NFD are distinct keys, names
    that differ only in case stay apart, specials are escaped on the wire and nowhere else."""
    assert NFC != NFD and NFC.encode() != NFD.encode()
    b = backend_factory(store)
    root = b.new_root()
    addr = b.address(root)
    src, back = tmp_path / "src", tmp_path / "back"
    write_tree(src, SPECIAL_NAMES)
    (src / "empty_dir" / "nested_empty").mkdir(parents=True)
    before = snapshot(tmp_path)
    up = run(tmp_path, "--json", "cp", f"{src}/", addr, env=b.env())
    assert up.returncode == 0, up.stderr
    assert (summary(up)["copied"], summary(up)["failed"]) == (len(SPECIAL_NAMES), 0)
    st = b.storage(root)
    assert {e.key: e.size for e in st.list()} == {k: len(v) for k, v in SPECIAL_NAMES.items()}
    down = run(tmp_path, "--json", "sync", addr, f"{back}/", env=b.env())
    assert down.returncode == 0, down.stderr
    assert byte_names(back) == {k.encode() for k in SPECIAL_NAMES}
    assert files_under(back) == SPECIAL_NAMES
    # empty directories are not an error and are not copied: a store holds no directories, and a
    # local destination gets only the directories its files need
    assert not (back / "empty_dir").exists()
    assert created_outside(before, snapshot(tmp_path), "back") == []
    again = run(tmp_path, "--json", "sync", addr, f"{back}/", env=b.env())
    assert (summary(again)["skipped"], summary(again)["copied"]) == (len(SPECIAL_NAMES), 0)


def test_empty_directories_local_to_local(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "e1" / "e2").mkdir(parents=True)
    (src / "only_empty").mkdir()
    write_tree(src, {"f.txt": b"f"})
    proc = run(tmp_path, "--json", "cp", f"{src}/", f"{dst}/")
    assert proc.returncode == 0, proc.stderr
    assert (summary(proc)["found"], summary(proc)["copied"], summary(proc)["failed"]) == (1, 1, 0)
    assert snapshot(dst) == {"f.txt"}, "empty directories are skipped silently"
    empty_src = tmp_path / "nothing"
    empty_src.mkdir()
    proc = run(tmp_path, "--json", "sync", f"{empty_src}/", f"{tmp_path}/dst2/")
    assert proc.returncode == 0, proc.stderr
    assert (summary(proc)["found"], summary(proc)["failed"]) == (0, 0)


def test_newline_in_a_local_name(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = {"new\nline.txt": b"nl", "tab\there.txt": b"tab", "cr\rname.txt": b"cr"}
    write_tree(src, names)
    proc = run(tmp_path, "--json", "cp", f"{src}/", f"{dst}/")
    assert proc.returncode == 0, proc.stderr
    assert files_under(dst) == names


def test_newline_name_through_ceph(tmp_path: Path, backend_factory: Any) -> None:
    ceph = backend_factory("s3-ceph")
    root = ceph.new_root()
    src, back = tmp_path / "src", tmp_path / "back"
    names = {"new\nline.txt": b"nl", "tab\there.txt": b"tab"}
    write_tree(src, names)
    assert run(tmp_path, "cp", f"{src}/", ceph.address(root)).returncode == 0
    proc = run(tmp_path, "cp", ceph.address(root), f"{back}/")
    assert proc.returncode == 0, proc.stderr
    assert files_under(back) == names


def test_newline_key_failure_is_one_line(tmp_path: Path, backend_factory: Any) -> None:
    """moto's router cannot take a key with a newline (it answers the PUT with a bare 404): the
    failure line escapes the newline instead of breaking in two."""
    s3 = backend_factory("s3-moto")
    src = tmp_path / "src"
    write_tree(src, {"new\nline.txt": b"nl", "fine.txt": b"fine"})
    proc = run(tmp_path, "cp", f"{src}/", s3.address(s3.new_root()))
    assert proc.returncode == 1
    [fail] = failed_lines(proc)
    assert fail.startswith("FAILED new\\nline.txt: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_destination_404_is_not_reported_as_source_deleted(tmp_path: Path, backend_factory: Any) -> None:
    s3 = backend_factory("s3-moto")
    src = tmp_path / "src"
    write_tree(src, {"new\nline.txt": b"nl"})
    proc = run(tmp_path, "cp", f"{src}/", s3.address(s3.new_root()))
    assert (src / "new\nline.txt").exists()
    [fail] = failed_lines(proc)
    assert "SOURCE_DELETED" not in fail, fail


# ---- symbolic links and permissions --------------------------------------------------------------------
def test_symlink_loops_are_detected_skipped_and_recorded(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"real/f.txt": b"real", "top.txt": b"top"})
    (src / "loop").mkdir()
    (src / "loop" / "up").symlink_to("..")  # a directory that contains itself
    (src / "self").symlink_to("self")  # ELOOP
    (src / "ping").symlink_to("pong")  # a cycle of two
    (src / "pong").symlink_to("ping")
    (src / "dangling").symlink_to("nowhere")
    (src / "alias").symlink_to("real")  # a plain directory link: followed
    (src / "abs_root").symlink_to(src)  # the root itself, absolute
    record = tmp_path / "links.txt"
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    proc = run(tmp_path, "--json", "-L", "--recordName", str(record), "cp", f"{src}/", f"{dst}/", timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 0, proc.stderr
    assert files_under(dst) == {"alias/f.txt": b"real", "real/f.txt": b"real", "top.txt": b"top"}
    assert sorted(record.read_text(encoding="utf-8").splitlines()) == [
        "abs_root", "dangling", "loop/up", "ping", "pong", "self"]
    assert created_outside(before, snapshot(tmp_path), "dst") == ["links.txt"]


def _python_for(user: str) -> str | None:
    """An interpreter `user` may run that can import ossimport (root's pyenv lives in /root, 0700)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", "env", f"PYTHONPATH={ROOT}",
             candidate, "-c", "import ossimport.cli, ossimport.storage.local"],
            capture_output=True, text=True, timeout=30, cwd="/")
        if probe.returncode == 0:
            return candidate
    return None


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A tmp dir that user nobody can reach (pytest's tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="ossimport-nobody-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for d, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o755)
    shutil.rmtree(path)


def test_unreadable_files_fail_with_a_cause(world_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot run the CLI as user nobody")
    python = _python_for("nobody")
    if python is None:
        pytest.skip("no Python interpreter that user nobody may run can import ossimport")
    src = world_tmp / "src"
    write_tree(src, {"ok.txt": b"ok", "locked.txt": b"locked", "closed/inner.txt": b"inner", "z.txt": b"z"})
    (src / "locked.txt").chmod(0o000)
    (src / "closed").chmod(0o000)
    out = world_tmp / "out"
    out.mkdir()
    out.chmod(0o777)  # world-writable: nobody may create DST in it
    before = snapshot(world_tmp)
    proc = run(world_tmp, "cp", f"{src}/", f"{out}/dst/", user="nobody", python=python, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    fails = failed_lines(proc)
    assert any(ln.startswith("FAILED locked.txt: AccessDenied: ") and "Permission denied" in ln for ln in fails), \
        proc.stderr
    assert any("closed" in ln and "Permission denied" in ln for ln in fails), proc.stderr
    assert files_under(out / "dst") == {"ok.txt": b"ok", "z.txt": b"z"}, "the readable files are still copied"
    assert (out / "dst" / "ok.txt").stat().st_uid == _uid("nobody")
    assert created_outside(before, snapshot(world_tmp), "out/dst") == []


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


# ---- bad job configs -----------------------------------------------------------------------------------
def _job_env(tmp_path: Path, **overrides: Any) -> JobEnv:
    src = tmp_path / "data"
    src.mkdir(exist_ok=True)
    job: dict[str, Any] = {"srcType": "local", "srcPrefix": f"{src}/", "destType": "local",
                           "destPrefix": f"{tmp_path}/out/"}
    job.update(overrides)
    return JobEnv(tmp_path, job)


BAD_JOBS: list[Any] = [
    pytest.param({"srcType": "ftp"}, "srcType='ftp' is not allowed", id="unknown-srcType"),
    pytest.param({"taskObjectCountLimit": "12x"}, "taskObjectCountLimit='12x' is not allowed", id="bad-number"),
    pytest.param({"taskObjectCountLimit": "-5"}, "taskObjectCountLimit='-5' is not allowed", id="negative-number"),
    pytest.param({"isIncremental": "maybe"}, "isIncremental='maybe' is not allowed", id="bad-boolean"),
    pytest.param({"jobName": "bad/name"}, "jobName='bad/name' is not allowed", id="bad-jobName"),
    pytest.param({"srcType": "s3", "srcBucket": "", "srcDomain": "http://127.0.0.1:9000"}, "srcBucket is missing",
                 id="missing-bucket-key"),
    pytest.param({"destType": "http"}, "destType='http' is not allowed", id="http-destination"),
    pytest.param({"srcPrefix": "/nonexistent/ossimport/source/"}, "/nonexistent/ossimport/source",
                 id="missing-srcPrefix-dir"),
    pytest.param({"srcType": "s3", "srcBucket": "b", "srcDomain": "http://127.0.0.1:99999",
                  "srcAccessKey": "a", "srcSecretKey": "b"}, "99999", id="port-out-of-range"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_JOBS)
def test_bad_job_config_is_one_line(tmp_path: Path, overrides: dict[str, Any], needle: str) -> None:
    env = _job_env(tmp_path, **overrides)
    before = snapshot(tmp_path)
    proc = env.console("submit", check=False, timeout=60)
    try:
        assert_one_line_error(proc, needle)
        assert "local_job.cfg" in proc.stderr, "the error names the file"
        queued = env.workdir / "master" / "jobqueue"
        assert not (queued.exists() and any(queued.iterdir())), "nothing was queued"
        assert not (env.workdir / "master" / "jobs").exists() or not any((env.workdir / "master" / "jobs").iterdir())
        new = created_outside(before, snapshot(tmp_path), "run")
        assert new == [], new
    finally:
        env.stop()


def test_bad_job_config_file_syntax(tmp_path: Path) -> None:
    env = _job_env(tmp_path)
    cfg = env.conf / "local_job.cfg"
    cfg.write_text(cfg.read_text() + "srcAccessKey=\\u12\n", encoding="utf-8")
    try:
        assert_one_line_error(env.console("submit", check=False), "local_job.cfg:", "malformed \\uXXXX escape")
    finally:
        env.stop()


def test_missing_local_source_is_a_usage_error(work: Path) -> None:
    before = snapshot(work)
    assert_one_line_error(run(work, "sync", "missing/", "dst/"), "source directory 'missing/' does not exist")
    assert snapshot(work) == before
