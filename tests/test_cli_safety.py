"""What a new user runs into (issue 14): overlapping SRC and DST, dry-run deletions, key ranges
that cannot match, names one side cannot hold, a file beside a directory of the same name.
Every run is the real CLI in its own process against real servers (moto S3, a private sshd)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, run_json, write_tree
from test_bad_input import assert_one_line_error, put_raw, raw_keys

from ossimport.address import parse_address


def files_of(top: Path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), top): Path(d, f).read_bytes() for d, _, fs in os.walk(top) for f in fs}


# ---- item 2: SRC and DST overlap ------------------------------------------------------------------
def test_sync_delete_dst_into_the_parent_of_src_is_refused_locally(tmp_path: Path) -> None:
    """The report: `--exclude '^a$' --delete-dst sync ov/sub/ ov/` deleted ov/sub/a for good."""
    ov = tmp_path / "ov"
    write_tree(ov, {"sub/a": b"a", "sub/b": b"b", "x": b"x"})
    before = files_of(ov)
    proc = run_cli("--exclude", "^a$", "--delete-dst", "sync", f"{ov}/sub/", f"{ov}/")
    assert_one_line_error(proc, "SRC is inside DST", "--delete-dst would delete it", "--exclude '^sub/'")
    assert files_of(ov) == before
    # a DST spelled through a symbolic link is the same directory
    (tmp_path / "alias").symlink_to(ov)
    proc = run_cli("--delete-dst", "sync", f"{ov}/sub/", f"{tmp_path}/alias/")
    assert_one_line_error(proc, "SRC is inside DST")
    assert files_of(ov) == before

    # the way out the message names: a filter that keeps sub/ out of both listings
    out = run_json("--exclude", "^sub/", "--delete-dst", "sync", f"{ov}/sub/", f"{ov}/")
    assert (out["copied"], out["deleted"]) == (2, 1)  # a and b copied up, x deleted
    assert files_of(ov) == {"sub/a": b"a", "sub/b": b"b", "a": b"a", "b": b"b"}


def test_overlapping_prefixes_in_one_bucket_are_refused(backend_factory: Any) -> None:
    s3 = backend_factory("s3-moto")
    base = s3.address(s3.new_root())  # s3://AK:SK@bucket.127.0.0.1:PORT/ROOT/
    files = {"sub/a": b"a", "sub/b": b"b", "x": b"x"}
    put_raw(base, files)
    loc = parse_address(base)
    # the same bucket written the MinIO way: the same store
    minio = f"minio://AKIDTEST1234:SECRET%2FTEST5678@{loc.endpoint}/{loc.bucket}/{loc.prefix}"
    for args, needle in (
            (["--delete-dst", "sync", base + "sub/", base], "SRC is inside DST"),
            (["--delete-dst", "sync", base + "sub/", minio], "SRC is inside DST"),
            (["cp", base, base + "sub/"], "DST is inside SRC"),
            (["sync", minio, base + "sub/"], "DST is inside SRC"),
            (["cp", base, minio], "SRC and DST are the same directory"),
            (["cp", base + "x", base], "SRC and DST are the same file")):
        line = assert_one_line_error(run_cli(*args), needle)
        assert "SECRET" not in line
        assert raw_keys(base) == {k: len(v) for k, v in files.items()}, args

    # excluding the inner prefix makes the copy safe: sub/ is not copied into itself
    out = run_json("--exclude-dir", "^sub$", "cp", base, base + "sub/")
    assert (out["copied"], out["excluded"]) == (1, 2)
    assert raw_keys(base) == {"sub/a": 1, "sub/b": 1, "x": 1, "sub/x": 1}
    # another prefix beside it is no overlap
    assert run_json("cp", base + "sub/", base + "other/")["copied"] == 3


def test_overlapping_sftp_paths_are_refused(backend_factory: Any) -> None:
    sftp = backend_factory("sftp")
    base = sftp.address(sftp.new_root())
    top = Path(parse_address(base).path)
    write_tree(top, {"sub/a": b"a", "x": b"x"})
    proc = run_cli("--delete-dst", "sync", base + "sub/", base, env=sftp.env())
    assert_one_line_error(proc, "SRC is inside DST")
    proc = run_cli("cp", base, base + "sub/", env=sftp.env())
    assert_one_line_error(proc, "DST is inside SRC")
    assert files_of(top) == {"sub/a": b"a", "x": b"x"}


# ---- item 7: a dry run deletes nothing and says so ----------------------------------------------------
def test_dryrun_delete_src_counts_would_delete(tmp_path: Path, backend_factory: Any) -> None:
    """Seed 000's 'rm' recipe: `--dryrun --deleteSrc cp SRC/ DST/`."""
    s3 = backend_factory("s3-moto")
    src = tmp_path / "src"
    write_tree(src, {f"f{i}": b"x" for i in range(13)})
    dst = s3.address(s3.new_root())
    out = run_json("--dryrun", "--deleteSrc", "cp", f"{src}/", dst)
    assert (out["deleted"], out["would_delete"], out["copied"]) == (0, 13, 13)
    proc = run_cli("-v", "--dryrun", "--deleteSrc", "cp", f"{src}/", dst)
    assert proc.returncode == 0, proc.stderr
    assert "would delete source f0" in proc.stderr and "deleted-source" not in proc.stderr
    assert "would delete 13," in proc.stdout and "deleted 13" not in proc.stdout
    assert len(files_of(src)) == 13 and raw_keys(dst) == {}


# ---- item 8: --start/--end that cannot match ------------------------------------------------------------
@pytest.mark.parametrize(("options", "needles"), [
    (["--start=aa", "--end==ff"], ["--start 'aa'", "--end '=ff'", "write --end=ff"]),
    (["--start", "m", "--end", "c"], ["--start 'm'", "--end 'c'"]),
], ids=["guide-typo", "start-after-end"])
def test_key_range_that_cannot_match_is_refused(tmp_path: Path, options: list[str], needles: list[str]) -> None:
    src = tmp_path / "src"
    write_tree(src, {"aa": b"1", "bb": b"2"})
    assert_one_line_error(run_cli("sync", *options, f"{src}/", f"{tmp_path}/dst/"), *needles)
    assert not (tmp_path / "dst").exists()


# ---- item 9: each key rule on the destination that needs it -------------------------------------------
@pytest.mark.parametrize("store", ["s3-moto", "oss"])
def test_local_names_an_object_store_can_hold_are_copied(tmp_path: Path, backend_factory: Any, store: str) -> None:
    s3 = backend_factory(store)
    src = tmp_path / "src"
    write_tree(src, {"back\\slash": b"bs", "cafe\u0301": b"accent", "plain": b"p"})
    bad = os.fsencode(src) + b"/bad\xff.txt"  # Latin-1, not UTF-8
    with open(bad, "wb") as f:
        f.write(b"latin")
    root = s3.new_root()
    dst = s3.address(root)
    proc = run_cli("--json", "cp", f"{src}/", dst)
    assert proc.returncode == 1
    fails = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED")]
    assert len(fails) == 1 and "InvalidObjectName" in fails[0] and "not valid UTF-8" in fails[0], proc.stderr
    assert fails[0].startswith("FAILED bad\\xff.txt: ") and "b'bad\\xff.txt'" in fails[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert {e.key: e.size for e in s3.storage(root).list()} == {"back\\slash": 2, "cafe\u0301": 6, "plain": 1}
    # back to a file system, the backslash is the destination's rule: refused there, one line
    proc = run_cli("cp", dst, f"{tmp_path}/back/")
    assert proc.returncode == 1
    [fail] = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED")]
    assert fail.startswith("FAILED back\\slash: InvalidObjectName: "), proc.stderr
    assert files_of(tmp_path / "back") == {"cafe\u0301": b"accent", "plain": b"p"}


# ---- item 10: a file beside a directory of the same name ------------------------------------------------
@pytest.mark.parametrize("dst_name", ["local", "sftp"])
def test_the_directory_wins_over_a_file_of_its_name(backend_factory: Any, dst_name: str) -> None:
    s3, fs = backend_factory("s3-moto"), backend_factory(dst_name)
    src = s3.address(s3.new_root())
    put_raw(src, {"a": b"file a", "a!": b"bang", "a/b": b"ab", "a/c": b"ac", "m/": b"marker", "m/f": b"mf",
                  "n/": b"", "z": b"z"})
    for _ in range(3):  # the same outcome every time, whichever copy would run first
        dst = fs.address(fs.new_root())
        top = Path(parse_address(dst).path)
        proc = run_cli("--json", "--threads", "8", "cp", src, dst, env=fs.env())
        assert proc.returncode == 1, proc.stderr
        fails = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED")]
        assert len(fails) == 1 and fails[0].startswith("FAILED a: PathConflict: "), proc.stderr
        assert "directory marker m/" in proc.stderr
        assert files_of(top) == {"a!": b"bang", "a/b": b"ab", "a/c": b"ac", "m/f": b"mf", "z": b"z"}


def test_refusals_name_a_usable_exclude(tmp_path: Path) -> None:
    """The --exclude the overlap message suggests works when pasted back, names with spaces too."""
    ov = tmp_path / "ov"
    write_tree(ov, {"my dir/a": b"a", "x": b"x"})
    line = assert_one_line_error(run_cli("sync", f"{ov}/my dir/", f"{ov}/"), "SRC is inside DST")
    suggested = shlex.split(line.rpartition(" with ")[2])
    assert suggested[0] == "--exclude"
    out = run_json(*suggested, "sync", f"{ov}/my dir/", f"{ov}/")
    assert out["copied"] == 1 and files_of(ov)["a"] == b"a"


# ---- item 11: the smaller ones -----------------------------------------------------------------------
def test_record_file_in_a_missing_directory_is_refused_before_copying(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a": b"a"})
    (src / "link").symlink_to("a")
    proc = run_cli("-rd", f"{tmp_path}/no/such/dir/links.txt", "cp", f"{src}/", f"{tmp_path}/dst/")
    assert_one_line_error(proc, "--recordName", "no/such/dir/links.txt", "No such file or directory")
    assert not (tmp_path / "dst").exists(), "nothing copied before the refusal"


def test_too_many_threads_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--threads=100000", "cp", f"{tmp_path}/", f"{tmp_path}/x/"),
                          "--threads", "'100000' is more than the 1000")


def test_info_honours_json(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a": b"x" * 10, "b/c": b"y" * 30, "d": b""})
    out = run_json("cp", "--info", f"{src}/", f"{tmp_path}/dst/")
    assert {k: out[k] for k in ("count", "total_bytes", "min", "max", "avg")} == \
        {"count": 3, "total_bytes": 40, "min": 0, "max": 30, "avg": 13}
    assert not (tmp_path / "dst").exists()


def test_sftp_url_form_is_accepted(tmp_path: Path, backend_factory: Any) -> None:
    """Seed 000 lists sftp as a NAME: sftp://user@host:port/absolute/path/."""
    sftp = backend_factory("sftp")
    loc = parse_address(sftp.address(sftp.new_root()))
    url = f"sftp://{loc.user}@127.0.0.1:{loc.port}{loc.path}"
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"alpha", "d/b.txt": b"beta"})
    assert run_json("cp", f"{src}/", url, env=sftp.env())["copied"] == 2
    assert files_of(Path(loc.path)) == {"a.txt": b"alpha", "d/b.txt": b"beta"}
    assert run_json("sync", url, f"{tmp_path}/back/", env=sftp.env())["copied"] == 2
    assert_one_line_error(run_cli("cp", f"{src}/", "sftp://127.0.0.1"), "has no path after the host")


def test_list_lines_without_a_scheme_are_named(tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("example.invalid/ a.txt\n", encoding="utf-8")
    proc = run_cli("cp", f"list://{listing}", f"{tmp_path}/dst/")
    assert proc.returncode == 1
    assert "FutureWarning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "'example.invalid/' has no scheme; begin it with http:// or https://" in proc.stderr


def test_audit_log_records_the_size_copied(tmp_path: Path, envs: list[Any]) -> None:
    from jobenv import JobEnv
    from test_jobs import local_keys

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"grows.txt": b"12345", "same.txt": b"same"})
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst)})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan")
    (src / "grows.txt").write_bytes(b"1234567890")  # after the scan, before the copy
    env.console("start", "--workers", "1")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    assert st["JobState"] == "SUCCEED", env.log_tail()
    audit = "".join((t / "audit.log").read_text() for t in env.task_dirs("succeed_tasks"))
    assert "COPIED\tgrows.txt\t10\n" in audit and "COPIED\tsame.txt\t4\n" in audit, audit
    assert (dst / "grows.txt").read_bytes() == b"1234567890"


def test_unknown_sftp_host_is_refused_until_trusted(tmp_path: Path, backend_factory: Any) -> None:
    sftp = backend_factory("sftp")
    addr = sftp.address(sftp.new_root())
    top = Path(parse_address(addr).path)
    known = tmp_path / "ssh" / "known_hosts"  # its directory does not exist yet: made on recording
    env = {**sftp.env(), "SSH_KNOWN_HOSTS": str(known)}
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"alpha", "b.txt": b"beta"})
    proc = run_cli("cp", f"{src}/", addr, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "UnknownHostKey" in proc.stderr and "--trust-new-hosts" in proc.stderr and "SHA256:" in proc.stderr
    assert files_of(top) == {} and not known.exists()

    proc = run_cli("--trust-new-hosts", "cp", f"{src}/", addr, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "was not known: recorded its ssh-ed25519 key SHA256:" in proc.stderr, proc.stderr
    # copy processes connecting at the same moment may each append it: the same line
    assert {tuple(line.split()) for line in known.read_text().splitlines()} == \
        {(f"[127.0.0.1]:{sftp.handle.port}", "ssh-ed25519", (sftp.handle.tmp / "host_ed25519.pub").read_text().split()[1])}
    assert files_of(top) == {"a.txt": b"alpha", "b.txt": b"beta"}
    again = run_cli("sync", f"{src}/", addr, env=env)  # known now: no flag, no warning
    assert again.returncode == 0 and again.stderr == "", again.stderr
