"""UpYun (youpai) as a read-only source: its REST API as documented, through the test double in
tests/servers/upyun_server.py (the storage contract itself runs in test_conformance.py).
End to end: cp / sync / verify to a local directory and to moto's S3, the upstream youpai
template as a job, and the refusals (wrong password, missing service, closed port, a clock
off by an hour, UpYun as a destination)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from backends import upyun as up
from helpers import compat_dir, digests, md5s, run_cli, run_json, tree
from jobenv import JobEnv, free_port
from servers.upyun_server import UpYunServer
from test_jobs import run_upstream_template
from test_sorting import needs_proc, open_temp_files, small_runs

from ossimport.address import parse_address
from ossimport.errors import NotFound, StorageError, UsageError
from ossimport.storage import open_storage
from ossimport.storage.upyun import signature

WRONG = "Wr0ng/Upyun:Pass"


@pytest.fixture
def upyun(backend_factory: Any) -> Any:
    return backend_factory("upyun")


def test_signature_is_the_documented_one() -> None:
    """The worked example of docs.upyun.com/api/authorization/ (operator123 / password123)."""
    key = hashlib.md5(b"password123").hexdigest()
    assert key == "482c811da5d5b4bc6d497ffa98491e38"
    assert signature(key, "POST", "/pretreatment/", "Wed, 09 Nov 2016 14:26:58 GMT",
                     "a2d75510f7ec654cc24cfa2b5a5a8182") == "6KGqGX4tFwqnCdSndEmGQsR1jQU="


@pytest.mark.parametrize(("address", "url", "prefix"), [
    ("upyun://op:pw@svc/", "https://v0.api.upyun.com", ""),
    ("youpai://op:p%2Fw@svc.v3.api.upyun.com/docs/", "https://v3.api.upyun.com", "docs/"),
    ("upyun://op:pw@svc.127.0.0.1:8080/a/b/", "http://127.0.0.1:8080", "a/b/"),
])
def test_address_names_operator_service_endpoint(address: str, url: str, prefix: str) -> None:
    loc = parse_address(address)
    assert (loc.backend, loc.access_key, loc.bucket, loc.prefix) == ("upyun", "op", "svc", prefix)
    st = open_storage(loc)
    assert st._base == url
    assert "pw" not in st.describe() and "p/w" not in repr(loc)


@pytest.mark.parametrize(("address", "says"), [
    ("upyun://svc/docs/", "UpYun needs its operator and the operator's password"),
    ("youpai://op:pw:tok@svc/", "UpYun needs its operator and the operator's password"),
    ("upyun://op@svc/", "credentials must be ACCESS_KEY:SECRET_KEY"),
])
def test_address_without_operator_and_password_is_refused(address: str, says: str) -> None:
    with pytest.raises(UsageError, match=says):
        parse_address(address)


def test_listing_pages_and_comes_out_in_byte_order(upyun: Any) -> None:
    """The double lists 3 entries a page, sorted as plain names (a directory `a` before a file
    `a!`); the listing must page through every directory and interleave directories with files by
    their full keys."""
    root = upyun.new_root()
    files = {"a": b"", "a!": b"1", "a b": b"2", "a0": b"3", "b/c/d/e.txt": b"deep",
             **{f"a/{i:02d}": bytes([i]) * i for i in range(11)}, "a/-/x": b"x", "z": b"zz"}
    del files["a"]  # a file and a directory cannot share a name on UpYun
    upyun.seed(root, files)
    st = upyun.storage(root)
    pages = upyun.handle.list_pages
    entries = list(st.list())
    assert [e.key for e in entries] == sorted(files, key=lambda k: k.encode())
    assert {e.key: e.size for e in entries} == {k: len(v) for k, v in files.items()}
    # root (6 entries: 2 pages), a/ (12: 4 pages), a/-/, b/, b/c/, b/c/d/: one page each
    assert upyun.handle.list_pages - pages == 2 + 4 + 4
    assert [e.key for e in st.list("a/", start_after="a/05")] == ["a/06", "a/07", "a/08", "a/09", "a/10"]
    assert st.list_dirs() == ["a/", "b/"]
    assert sorted(e.key for e in st.list_level("a/")) == sorted(["a/-/", *(f"a/{i:02d}" for i in range(11))])


@needs_proc
def test_a_directory_longer_than_a_sort_run_is_sorted_on_disk(upyun: Any, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """Directories of many runs (a run is 7 entries here): sorted through temporary files that are
    closed at the end, in byte order with subdirectories (`a` sorts as `a/`) between the files."""
    spill = small_runs(monkeypatch, tmp_path)
    root = upyun.new_root()
    files = {f"{name}{i}": bytes([i]) * i for i in range(6) for name in ("a!", "a-", "a0", "ü", "文件 ", "😀")}
    files.update({f"a/{i}": b"x" * i for i in range(20)})  # a directory between "a-…" and "a0…"
    files.update({"a/1 sub/deep": b"deep", "a/11x/deep": b"deeper"})
    upyun.seed(root, files)
    st = upyun.storage(root)
    listing = st.list()
    first = next(listing)
    assert open_temp_files(spill)  # the root's runs are on disk, merged as the walk goes
    entries = [first, *listing]
    assert [e.key for e in entries] == sorted(files, key=lambda k: k.encode())
    assert {e.key: e.size for e in entries} == {k: len(v) for k, v in files.items()}
    assert open_temp_files(spill) == []
    assert [e.key for e in st.list("a/1", start_after="a/11")] == ["a/11x/deep", *(f"a/{i}" for i in range(12, 20))]
    listing = st.list()
    for _ in range(10):  # down into a/ (a second sort), then stop early
        next(listing)
    listing.close()
    assert open_temp_files(spill) == []


def test_ranged_reads(upyun: Any) -> None:
    root = upyun.new_root()
    data = os.urandom(100_000)
    upyun.seed(root, {"blob.bin": data})
    st = upyun.storage(root)
    for start, end in ((0, None), (0, 1), (1, 99_999), (65_536, None), (99_999, 100_000), (100_000, None)):
        with st.open("blob.bin", start, end) as f:
            assert f.read() == data[start:end], (start, end)
    head = st.head("blob.bin")
    assert (head.size, head.checksums) == (len(data), {})  # UpYun documents no checksum of the content
    with pytest.raises(NotFound):
        st.head("absent.bin")
    with pytest.raises(NotFound):
        st.open("absent.bin", 10, 20)


def test_writes_are_refused(upyun: Any, tmp_path: Path) -> None:
    import io

    st = upyun.storage(upyun.new_root())
    assert st.abilities.read_only
    for attempt in (lambda: st.put("k", io.BytesIO(b"x"), 1), lambda: st.delete("k")):
        with pytest.raises(StorageError) as err:
            attempt()
        assert err.value.code == "ReadOnly"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    proc = run_cli("cp", f"{src}/", upyun.address(upyun.new_root()))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "upyun is a read-only source" in lines[0], proc.stderr
    assert up.PASSWORD not in proc.stderr and quote(up.PASSWORD, safe="") not in proc.stderr


@pytest.mark.parametrize("source", ["upyun", "http"])
def test_delete_src_of_a_read_only_source_is_refused_up_front(tmp_path: Path, backend_factory: Any,
                                                              source: str) -> None:
    """Not one ReadOnly failure per file after each copy: the run is refused before it starts
    (the rule follows the backend's declared ability, so every read-only source has it)."""
    b = backend_factory(source)
    root = b.new_root()
    b.seed(root, {"a.txt": b"a", "d/b.txt": b"b"})
    proc = run_cli("--delete-src", "cp", b.address(root), f"{tmp_path}/out/")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"--delete-src: {source} is a read-only source" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ---- the CLI end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dest", ["local", "s3-moto"])
def test_cp_sync_verify(tmp_path: Path, upyun: Any, backend_factory: Any, dest: str) -> None:
    files = tree(big=3 * 1024 * 1024 + 17)  # the big one read in ranged parts
    root = upyun.new_root()
    upyun.seed(root, files)
    src = upyun.address(root)
    if dest == "local":
        dst, read_back = f"{tmp_path}/out/", lambda: md5s({str(p.relative_to(tmp_path / "out")): p.read_bytes()
                                                          for p in (tmp_path / "out").rglob("*") if p.is_file()})
    else:
        s3 = backend_factory(dest)
        s3_root = s3.new_root()
        dst, read_back = s3.address(s3_root), lambda: digests(s3.storage(s3_root))
    small = ["--multipart-threshold", "1m", "--part-size", "1m"]
    first = run_json(*small, "cp", src, dst)
    assert (first["found"], first["copied"], first["failed"]) == (len(files), len(files), 0)
    assert first["copied_bytes"] == sum(map(len, files.values()))
    assert read_back() == md5s(files)
    again = run_json(*small, "sync", src, dst)
    assert (again["copied"], again["skipped"], again["failed"]) == (0, len(files), 0)
    for flags in ([], ["--checksum"]):
        out = run_json(*flags, "verify", src, dst)
        assert (out["identical"], out["missing"], out["differ"], out["extra"]) == (len(files), 0, 0, 0)
    one = run_json("cp", src + "a/b/sibling.txt", f"{tmp_path}/single.txt")
    assert one["copied"] == 1 and (tmp_path / "single.txt").read_bytes() == files["a/b/sibling.txt"]


def test_transient_failures_are_asked_again(tmp_path: Path, upyun: Any) -> None:
    """A listing page answered 503 (twice) is asked for again, not the run failed; a download
    whose connection breaks mid-body is read again. Every file arrives whole."""
    from servers.faultproxy import Fault, FaultProxy

    files = tree()
    root = upyun.new_root()
    upyun.seed(root, files)
    with FaultProxy("127.0.0.1", upyun.handle.port) as proxy:
        proxy.add(Fault("slowdown", count=2, method="GET", path=rf"/{up.SERVICE}/{root}/a/b/$"),
                  Fault("reset_mid", count=1, method="GET", path=rf"/{root}/a/b/c/deep\.bin$"))
        out = run_json("cp", up.address(upyun.handle, root, port=proxy.port), f"{tmp_path}/out/")
        assert (proxy.injected["slowdown"], proxy.injected["reset_mid"]) == (2, 1)
    assert (out["found"], out["copied"], out["failed"]) == (len(files), len(files), 0)
    assert md5s({str(p.relative_to(tmp_path / "out")): p.read_bytes()
                 for p in (tmp_path / "out").rglob("*") if p.is_file()}) == md5s(files)


@pytest.mark.parametrize(("case", "says"), [
    ("wrong password", "40100005 signature error: check the operator name and password"),
    ("clock an hour off", "40100002 date offset error"),
    ("missing service", "the UpYun service 'nosuchservice' does not exist"),
    ("closed port", "connection refused"),
])
def test_refusals_are_one_clear_line(tmp_path: Path, upyun: Any, case: str, says: str) -> None:
    root = upyun.new_root()
    upyun.seed(root, {"remote.txt": b"remote"})
    addr = {
        "wrong password": up.address(upyun.handle, root, password=WRONG),
        "clock an hour off": upyun.address(root),
        "missing service": up.address(upyun.handle, root, service="nosuchservice"),
        "closed port": up.address(upyun.handle, root, port=free_port()),
    }[case]
    if case == "clock an hour off":
        upyun.handle.clock_offset = 3600
    try:
        procs = [run_cli("--json", cmd, addr, f"{tmp_path}/dst/", timeout=120) for cmd in ("sync", "cp", "verify")]
    finally:
        upyun.handle.clock_offset = 0
    for proc in procs:
        errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "FAILED" in line]
        assert proc.returncode == 1 and len(errors) == 1 and says in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        for secret in (up.PASSWORD, WRONG):
            for form in (secret, quote(secret, safe=""), hashlib.md5(secret.encode()).hexdigest()):
                assert form not in proc.stdout + proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary.get("copied", 0) == 0 and summary.get("identical", 0) == 0
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").rglob("*"))


# ---- the upstream youpai template as a job ---------------------------------------------------------------
@pytest.fixture
def template_service() -> Iterator[UpYunServer]:
    """A service named, and an operator keyed, as the template writes them."""
    server = UpYunServer({"operator": "password"})
    server.create_service("mybucket")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("dest", ["local", "s3-moto"])
def test_upstream_youpai_template_runs_as_a_job(tmp_path: Path, envs: list[JobEnv], backend_factory: Any,
                                                template_service: UpYunServer, dest: str) -> None:
    """youpai/job.cfg unchanged but for where its ends are: srcDomain at the UpYun double, the
    destination a local directory or moto's S3."""
    template_file = compat_dir() / "youpai" / "job.cfg"
    if not template_file.exists():
        pytest.skip(f"the upstream templates are not here: {template_file} is missing")
    files = {f"docs/{k}": v for k, v in tree().items()}
    for key, data in {**files, "elsewhere/not-copied.txt": b"outside srcPrefix"}.items():
        template_service.put("mybucket", key, data)
    template = template_file.read_text(encoding="utf-8")
    assert re.search(r"^srcType=youpai$", template, re.M) and re.search(r"^srcPrefix=docs/$", template, re.M)
    overrides = {"srcDomain": f"http://127.0.0.1:{template_service.port}"}
    run_upstream_template(tmp_path, envs, backend_factory, template, overrides, files, dest)
    assert template_service.refused == 0


def test_a_parallel_scan_counts_every_file_once(tmp_path: Path, envs: list[JobEnv], upyun: Any) -> None:
    """scanThreadCount > 1 cuts the source at its directories (list_dirs, two levels down) and
    lists each range from its lower bound: every file is copied, none twice."""
    files = {**{f"d{i}/s{j}/f{k}.txt": f"{i}{j}{k}".encode() for i in range(3) for j in range(3) for k in range(2)},
             "top.txt": b"top", "d1!": b"beside d1", "d1/s1!.txt": b"beside s1"}
    root = upyun.new_root()
    upyun.seed(root, files)
    out = tmp_path / "out"
    env = JobEnv(tmp_path, job={"jobName": "upyun_scan", "srcType": "youpai", "srcAccessKey": up.OPERATOR,
                                "srcSecretKey": up.PASSWORD, "srcDomain": f"http://127.0.0.1:{upyun.handle.port}",
                                "srcBucket": up.SERVICE, "srcPrefix": f"{root}/", "destType": "local",
                                "destPrefix": f"{out}/", "scanThreadCount": 4, "maxMultiThreadScanDepth": 2,
                                "taskObjectCountLimit": 5})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "1")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=180)
    assert st["JobState"] == "SUCCEED", env.log_tail()
    assert (st["Files Total"], st["Files Done"], st["Files Failed"]) == (len(files), len(files), 0)
    assert sorted(env.audit_keys()) == sorted(files)
    assert md5s({str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}) == md5s(files)

