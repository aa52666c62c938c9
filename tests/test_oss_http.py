"""OSSStorage through the OSS shim (oss2's real client code over real sockets, moto behind it) and
HTTPListStorage against a real HTTP/1.1 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oss2
import pytest
from backends import http as http_backend
from backends import oss as oss_backend
from test_sorting import needs_proc, open_temp_files, small_runs

from ossimport.address import parse_address
from ossimport.errors import NotFound, StorageError, VerifyFailed
from ossimport.storage import Storage, StorageOptions, open_storage, sorting
from ossimport.storage.base import CRC64
from ossimport.storage.http import HTTPListStorage
from ossimport.storage.oss import OSSStorage

KiB = 1024


def crc64(data: bytes) -> str:
    c = oss2.utils.Crc64()
    c.update(data)
    return str(c.crc)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- OSS ----------------------------------------------------------------------------------------
@pytest.fixture
def oss(backend_factory: Any) -> Any:
    b = backend_factory("oss")
    yield b
    b.handle.shim.clear_faults()


def oss_storage(oss: Any, root: str | None = None, *, creds: str | None = None, bucket: str | None = None,
                **options: Any) -> OSSStorage:
    h = oss.handle
    creds = f"{oss_backend.ACCESS_KEY}:{oss_backend.SECRET_KEY}@" if creds is None else creds
    addr = f"oss://{creds}{bucket or h.bucket}.127.0.0.1:{h.shim.port}/{root or oss.new_root()}/"
    st = open_storage(parse_address(addr), StorageOptions(**options))
    assert isinstance(st, OSSStorage)
    oss._opened.append(st)
    return st


UNICODE = {
    "ünïcødé/文件.txt": "日本語のテキスト".encode(),
    "spaces and+plus/100%.bin": os.urandom(1000),
    "emoji/😀 🚀.dat": b"\x00\xff" * 50,
    "ключ": b"",
}


def test_oss_unicode_round_trip(oss: Any) -> None:
    st = oss_storage(oss)
    for key, data in UNICODE.items():
        e = st.put(key, io.BytesIO(data), len(data))
        assert (e.key, e.size) == (key, len(data))
        assert e.etag == hashlib.md5(data).hexdigest()  # lower-case md5, though OSS sends upper case
        assert e.checksums[CRC64] == crc64(data)
    listed = list(st.list())
    assert [e.key for e in listed] == sorted(UNICODE, key=lambda k: k.encode())
    for e in listed:
        assert e.size == len(UNICODE[e.key])
        assert e.etag == hashlib.md5(UNICODE[e.key]).hexdigest()
        assert abs(e.mtime - time.time()) < 120
        with st.open(e.key) as f:
            assert f.read() == UNICODE[e.key]


def test_oss_head_reports_crc64_of_the_bytes(oss: Any) -> None:
    st = oss_storage(oss)
    data = os.urandom(123_457)
    st.put("blob", io.BytesIO(data), len(data))
    e = st.head("blob")
    assert e.size == len(data)
    assert e.checksums == {CRC64: crc64(data)}
    assert st.abilities.hashes == {"crc64"}  # no MD5: OSS ETags of multipart and appendable objects are none


def test_oss_ranged_reads(oss: Any) -> None:
    st = oss_storage(oss)
    data = os.urandom(5000)
    st.put("r", io.BytesIO(data), len(data))
    with st.open("r", 100, 200) as f:
        assert f.read() == data[100:200]
    with st.open("r", 4990) as f:
        assert f.read(4) + f.read() == data[4990:]
    with st.open("r", 4000, 99_999) as f:  # an end past the object is clipped
        assert f.read() == data[4000:]
    for start in (5000, 7000):  # from the end (or past it): nothing, not the whole object
        with st.open("r", start) as f:
            assert f.read() == b""
    with pytest.raises(NotFound):
        st.open("absent", 10, 10)


def test_oss_multipart_three_parts_and_tail(oss: Any) -> None:
    st = oss_storage(oss)
    psize = st.abilities.min_part_size
    assert psize == 100 * KiB
    chunks = [os.urandom(psize), os.urandom(psize + 7), os.urandom(psize), b"tail bytes"]
    upload = st.create_multipart("mp/big.bin")
    assert ("mp/big.bin", upload) in list(st.list_multipart("mp/"))
    parts = [st.upload_part("mp/big.bin", upload, n, c) for n, c in reversed(list(enumerate(chunks, 1)))]
    done = st.complete_multipart("mp/big.bin", upload, parts)
    whole = b"".join(chunks)
    assert done.size == len(whole)
    assert done.etag is not None and done.etag.endswith("-4")
    assert done.checksums[CRC64] == crc64(whole)
    with st.open("mp/big.bin") as f:
        assert f.read() == whole
    assert st.head("mp/big.bin").checksums[CRC64] == crc64(whole)
    assert list(st.list_multipart()) == []


def test_oss_multipart_small_part_refused_and_abort(oss: Any) -> None:
    st = oss_storage(oss)
    upload = st.create_multipart("small")
    parts = [st.upload_part("small", upload, 1, b"x" * 1000), st.upload_part("small", upload, 2, b"y")]
    with pytest.raises(StorageError) as err:
        st.complete_multipart("small", upload, parts)
    assert err.value.code == "EntityTooSmall" and not err.value.retryable
    st.abort_multipart("small", upload)
    st.abort_multipart("small", upload)  # twice: still fine
    assert list(st.list_multipart()) == []
    with pytest.raises(NotFound):
        st.head("small")


def test_oss_server_side_copy(oss: Any) -> None:
    st = oss_storage(oss)
    data = os.urandom(10_000)
    st.put("src/a.bin", io.BytesIO(data), len(data))
    e = st.copy("src/a.bin", "dst/a copy.bin")
    assert (e.size, e.checksums[CRC64]) == (len(data), crc64(data))
    with st.open("dst/a copy.bin") as f:
        assert f.read() == data
    # from another root in the same bucket, and from another bucket on the same server
    other_bucket = f"oss-{os.urandom(4).hex()}"
    oss.handle.shim.create_bucket(other_bucket)
    for dst in (oss_storage(oss), oss_storage(oss, bucket=other_bucket)):
        assert dst.same_server(st)
        dst.copy("src/a.bin", "got", src_root=st)
        assert dst.head("got").checksums[CRC64] == crc64(data)
    with pytest.raises(NotFound):
        st.copy("nope", "x")
    # another access key or endpoint is another server for copying purposes
    assert not st.same_server(oss_storage(oss, creds="", anonymous=True))


def test_oss_list_prefix_start_after_and_paging(oss: Any) -> None:
    root = oss.new_root()
    st = oss_storage(oss, root)
    keys = ["a", "a/1", "a/2", "a0", "b/x", "b/y/z", "c"]
    for k in keys:
        st.put(k, io.BytesIO(k.encode()), len(k))
    neighbour = oss_storage(oss, root + "x")  # shares the prefix string, not the directory
    neighbour.put("zzz", io.BytesIO(b"z"), 1)
    # a console-made "directory" marker is not a file
    raw = oss2.Bucket(oss2.Auth(oss_backend.ACCESS_KEY, oss_backend.SECRET_KEY),
                      f"http://127.0.0.1:{oss.handle.shim.port}", oss.handle.bucket)
    raw.put_object(f"{root}/b/", b"")
    st.list_page_size = 2  # force several ListObjectsV2 pages with continuation tokens
    assert [e.key for e in st.list()] == keys
    assert [e.key for e in st.list(prefix="a/")] == ["a/1", "a/2"]
    assert [e.key for e in st.list(start_after="a/2")] == ["a0", "b/x", "b/y/z", "c"]
    assert [e.key for e in st.list(prefix="b/", start_after="b/x")] == ["b/y/z"]
    assert [e.key for e in st.list(prefix="nothing")] == []
    assert {e.key: e.size for e in st.list()} == {k: len(k) for k in keys}


def test_oss_missing_bucket_is_not_found(oss: Any) -> None:
    st = oss_storage(oss, bucket="no-such-bucket-here")
    with pytest.raises(NotFound) as err:
        st.head("k")
    assert err.value.code == "NoSuchBucket"
    with pytest.raises(NotFound) as err:
        list(st.list())
    assert err.value.code == "NoSuchBucket"
    with pytest.raises(NotFound) as err:
        st.put("k", io.BytesIO(b"v"), 1)
    assert err.value.code == "NoSuchBucket"


def test_oss_missing_key(oss: Any) -> None:
    st = oss_storage(oss)
    with pytest.raises(NotFound) as err:
        st.head("nope")
    assert err.value.code == "NoSuchKey"
    with pytest.raises(NotFound):
        st.open("nope")
    st.delete("nope")  # deleting a missing key is not an error


@pytest.mark.parametrize("given", [9, 11, 0])
def test_oss_put_size_mismatch_writes_nothing(oss: Any, given: int) -> None:
    st = oss_storage(oss)
    with pytest.raises(StorageError) as err:
        st.put("wrong", io.BytesIO(b"0123456789"), given)
    assert err.value.code == "SIZE_NOT_MATCH"
    assert list(st.list()) == []
    st.put("right", io.BytesIO(b"0123456789"), 10)  # the pooled connection still works
    assert st.head("right").size == 10


def test_oss_crc_mismatch_is_detected(oss: Any) -> None:
    st = oss_storage(oss)
    st.put("k", io.BytesIO(b"payload"), 7)
    oss.handle.shim.crc_offset = 1  # the server now reports a CRC64 that does not match the bytes
    with pytest.raises(VerifyFailed) as err, st.open("k") as f:
        f.read()
    assert err.value.code == "CHECKSUM_NOT_MATCH"
    with st.open("k", 1, 3) as f:  # a range cannot be checked against the whole object's CRC
        assert f.read() == b"ay"
    with pytest.raises(VerifyFailed):
        st.put("k2", io.BytesIO(b"other"), 5)  # oss2 checks the PUT answer end to end


def test_oss_errors_are_mapped_and_hide_secrets(oss: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shim = oss.handle.shim
    bad_secret = "WRONGSECRET99"
    st = oss_storage(oss, creds=f"{oss_backend.ACCESS_KEY}:{bad_secret}@")
    with pytest.raises(StorageError) as err:
        st.head("k")
    assert (err.value.code, err.value.retryable) == ("SignatureDoesNotMatch", False)
    assert bad_secret not in str(err.value) and bad_secret not in st.describe() + repr(st.location)

    with pytest.raises(StorageError) as err:
        oss_storage(oss, creds="NOSUCHKEY:whatever@").head("k")
    assert err.value.code == "InvalidAccessKeyId"

    for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StorageError) as err:
        oss_storage(oss, creds="")
    assert err.value.code == "MissingCredentials"
    with pytest.raises(StorageError) as err:
        oss_storage(oss, creds="", anonymous=True).head("k")
    assert err.value.code == "AccessDenied"

    shim.inject_errors(503, "ServiceUnavailable")
    with pytest.raises(StorageError) as err:
        oss_storage(oss).head("k")
    assert (err.value.code, err.value.retryable) == ("ServiceUnavailable", True)

    addr = f"oss://a:b@bucket.127.0.0.1:{closed_port()}/"
    with open_storage(parse_address(addr), StorageOptions(connect_timeout=2)) as st, \
            pytest.raises(StorageError) as err:
        st.head("k")
    assert (err.value.code, err.value.retryable) == ("ConnectionRefused", True)


def test_oss_credentials_from_env_sts_and_anonymous(oss: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shim, bucket = oss.handle.shim, oss.handle.bucket
    root = oss.new_root()
    oss_storage(oss, root).put("k", io.BytesIO(b"v"), 1)

    monkeypatch.setenv("OSS_ACCESS_KEY_ID", oss_backend.ACCESS_KEY)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", oss_backend.SECRET_KEY)
    monkeypatch.delenv("OSS_SESSION_TOKEN", raising=False)
    assert oss_storage(oss, root, creds="").head("k").size == 1

    shim.credentials["STSAKID0001"] = "STSSECRET0001"
    shim.sts_tokens["STSAKID0001"] = "TOKEN-ABC"
    try:
        st = oss_storage(oss, root, creds="STSAKID0001:STSSECRET0001:TOKEN-ABC@")
        assert st.head("k").size == 1
        assert "TOKEN-ABC" not in st.describe() + repr(st.location)
        with pytest.raises(StorageError) as err:
            oss_storage(oss, root, creds="STSAKID0001:STSSECRET0001:WRONG@").head("k")
        assert err.value.code == "InvalidAccessKeyId"
    finally:
        del shim.credentials["STSAKID0001"], shim.sts_tokens["STSAKID0001"]

    monkeypatch.delenv("OSS_ACCESS_KEY_ID")
    monkeypatch.delenv("OSS_ACCESS_KEY_SECRET")
    shim.public_buckets.add(bucket)
    try:
        anon = oss_storage(oss, root, creds="", anonymous=True)
        with anon.open("k") as f:
            assert f.read() == b"v"
        with pytest.raises(StorageError) as err:
            anon.put("x", io.BytesIO(b"v"), 1)
        assert err.value.code == "AccessDenied"
    finally:
        shim.public_buckets.discard(bucket)


# ---- HTTP ---------------------------------------------------------------------------------------
_http_opened: list[Storage] = []


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Any]:
    """A private HTTP server (tests here change its behaviour) serving tmp_path/www."""
    handle = http_backend.start(tmp_path)
    yield handle
    while _http_opened:
        _http_opened.pop().close()
    http_backend.stop(handle)


def http_storage(address: str, **options: Any) -> HTTPListStorage:
    st = open_storage(parse_address(address), StorageOptions(**options))
    assert isinstance(st, HTTPListStorage)
    _http_opened.append(st)
    return st


def write_list(web: Any, name: str, lines: list[str]) -> str:
    path = web.tmp / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return f"list://{path}"


FILES = {
    "b/2.bin": os.urandom(2000),
    "a b.txt": b"spaces",
    "a/1": b"",
    "ünï/文件": "中文".encode(),
    "z": b"z" * 70_000,
    "a0": b"0",
}


def test_http_list_heads_urls_in_parallel_within_the_threads(web: Any) -> None:
    """list() HEADs every URL for its size: --threads at a time, not one after the other."""
    files = {f"k{i:02d}": bytes(i) for i in range(12)}
    for key, data in files.items():
        (web.www / "p").mkdir(exist_ok=True)
        (web.www / "p" / http_backend._stored_name(key)).write_bytes(data)
    lines = [f"http://127.0.0.1:{web.port}/p/ {k}" for k in files]
    web.server.hold_heads = 4
    st = http_storage(write_list(web, "p.list", lines), threads=4)
    assert [(e.key, e.size) for e in st.list()] == [(k, len(v)) for k, v in files.items()]
    assert web.server.most_heads_in_flight == 4


def test_http_list_is_sorted_with_exact_sizes(web: Any) -> None:
    http_backend.seed(web, "r", {})  # creates nothing, list file is written below
    for key, data in FILES.items():
        (web.www / "r").mkdir(exist_ok=True)
        (web.www / "r" / http_backend._stored_name(key)).write_bytes(data)
    prefix = f"http://127.0.0.1:{web.port}/r/"
    lines = [f"{prefix} {k}" for k in FILES]
    random.Random(7).shuffle(lines)
    lines[2:2] = ["# a comment", "", "   "]
    lines.append(f"{prefix}\tb/2.bin")  # a duplicate, tab-separated: the first line wins
    st = http_storage(write_list(web, "r.list", lines), max_pool=2)
    entries = list(st.list())
    assert [e.key for e in entries] == sorted(FILES, key=lambda k: k.encode())
    assert {e.key: e.size for e in entries} == {k: len(v) for k, v in FILES.items()}
    for e in entries:
        mtime = (web.www / "r" / http_backend._stored_name(e.key)).stat().st_mtime
        assert int(e.mtime) == int(mtime)
    assert st.list_errors == []
    assert [e.key for e in st.list(prefix="a")] == ["a b.txt", "a/1", "a0"]
    assert [e.key for e in st.list(start_after="a/1")] == ["a0", "b/2.bin", "z", "ünï/文件"]
    # every HEAD went over a handful of pooled keep-alive connections
    assert web.server.connections <= 2 < web.server.requests


@needs_proc
def test_http_list_longer_than_a_sort_run_is_sorted_on_disk(web: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list file of many runs (a run is 7 lines here): sorted through temporary files that are
    closed at the end, in byte order, a duplicate key's first line winning across runs."""
    spill = small_runs(monkeypatch, web.tmp)
    files = {f"{name}{i}": bytes(i) for i in range(12) for name in ("f", "d/", "d", "ü/", "文件 ", "😀")}
    http_backend.seed(web, "big", files)
    http_backend.seed(web, "other", {"f3": b"not this one"})
    lines = [f"http://127.0.0.1:{web.port}/big/ {k}" for k in files]
    random.Random(11).shuffle(lines)
    lines.insert(len(lines) - 3, f"http://127.0.0.1:{web.port}/other/\tf3")  # a later duplicate
    st = http_storage(write_list(web, "big.list", lines))
    listing = st.list()
    first = next(listing)
    assert open_temp_files(spill)  # the runs are on disk, merged as the listing goes
    entries = [first, *listing]
    assert [e.key for e in entries] == sorted(files, key=lambda k: k.encode())
    assert {e.key: e.size for e in entries} == {k: len(v) for k, v in files.items()}  # f3: the first line's
    assert st.list_errors == [] and open_temp_files(spill) == []
    assert [e.key for e in st.list(prefix="d/1")] == ["d/1", "d/10", "d/11"]
    assert [e.key for e in st.list(start_after="😀1")][:3] == ["😀10", "😀11", "😀2"]
    listing = st.list()
    next(listing)
    listing.close()  # a consumer that stops early
    assert open_temp_files(spill) == []
    # head()/open() find a key's URL in the same order: the first line's for a duplicate
    assert (st.head("f3").size, st.head("😀11").size) == (3, 11)
    with st.open("d/10") as f:
        assert f.read() == bytes(10)
    with pytest.raises(NotFound):
        st.head("f12")


def test_http_head_of_a_long_list_holds_a_small_fraction_of_it(web: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """head()/open() look a key's URL up in an index of the whole list: built through the sort and
    kept on disk, so the first head() of a 200,000-line list (runs of 1,000 lines here) peaks at a
    small fraction of the list file's size (a dict of it held more than the file)."""
    monkeypatch.setattr(sorting, "RUN_SIZE", 1000)
    http_backend.seed(web, "many", {"k7": b"seven"})
    prefix = f"http://127.0.0.1:{web.port}/many/"
    lines = 200_000
    address = write_list(web, "many.list", [f"{prefix} k{i * 7919 % lines}" for i in range(lines)])
    st = http_storage(address)
    tracemalloc.start()
    try:
        assert st.head("k7").size == 5
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak * 5 < (web.tmp / "many.list").stat().st_size, peak


def test_http_columns_and_bad_lines(web: Any) -> None:
    http_backend.seed(web, "c", {"k1": b"one", "dir/k2": b"two!"})
    base = f"http://127.0.0.1:{web.port}/c/"
    addr = write_list(web, "c.list", [f"k1 x {base}", f"dir/k2 y {base}", "lonely"])
    st = http_storage(addr, http_prefix_column=3, http_key_column=1)
    assert [(e.key, e.size) for e in st.list()] == [("dir/k2", 4), ("k1", 3)]
    assert len(st.list_errors) == 1 and st.list_errors[0].startswith(f"{web.tmp}/c.list:3: ")


def test_http_ranged_open(web: Any) -> None:
    data = os.urandom(100_000)
    http_backend.seed(web, "g", {"f.bin": data})
    st = http_storage(http_backend.address(web, "g"))
    with st.open("f.bin") as f:
        assert f.read() == data
    with st.open("f.bin", 10, 20) as f:
        assert f.read() == data[10:20]
    with st.open("f.bin", 99_990) as f:
        assert f.read(3) + f.read() == data[99_990:]
    with st.open("f.bin", 100_000) as f:
        assert f.read() == b""
    # a server that ignores Range answers 200 with everything: the reader still returns the range
    web.server.honour_range = False
    with st.open("f.bin", 5, 50_005) as f:
        assert f.read() == data[5:50_005]
    with st.open("f.bin", 99_000) as f:
        assert f.read() == data[99_000:]


def test_http_is_read_only(web: Any) -> None:
    http_backend.seed(web, "ro", {"k": b"v"})
    st = http_storage(http_backend.address(web, "ro"))
    assert st.abilities.read_only and st.abilities.ranged_read
    with pytest.raises(StorageError) as err:
        st.put("k", io.BytesIO(b"x"), 1)
    assert err.value.code == "ReadOnly"
    with pytest.raises(StorageError) as err:
        st.delete("k")
    assert err.value.code == "ReadOnly"
    assert (web.www / "ro" / "k").read_bytes() == b"v"


def test_http_missing_url_is_not_found(web: Any) -> None:
    http_backend.seed(web, "m", {"here": b"1", "gone": b"2"})
    (web.www / "m" / "gone").unlink()  # listed, but the server no longer has it
    st = http_storage(http_backend.address(web, "m"))
    assert [e.key for e in st.list()] == ["here"]
    assert len(st.list_errors) == 1
    assert st.list_errors[0].startswith("gone: ") and "HTTP 404 (NoSuchKey)" in st.list_errors[0]
    with pytest.raises(NotFound):
        st.head("gone")
    with pytest.raises(NotFound):
        st.open("gone")
    with pytest.raises(NotFound):
        st.head("never-listed")


def test_http_single_url_and_connection_errors(web: Any) -> None:
    http_backend.seed(web, "one", {"file name.bin": b"single"})
    url = f"http://127.0.0.1:{web.port}/one/file%20name.bin"
    st = http_storage(url)
    assert [(e.key, e.size) for e in st.list()] == [("file name.bin", 6)]
    with st.open("file name.bin") as f:
        assert f.read() == b"single"
    # what Location.split_object makes of a URL: its directory plus the name (kept percent-encoded
    # by address.py, so an unescaped name here)
    http_backend.seed(web, "one", {"plain.bin": b"plain"})
    parent, name = parse_address(f"http://127.0.0.1:{web.port}/one/plain.bin").split_object()
    via_parent = open_storage(parent)
    _http_opened.append(via_parent)
    assert via_parent.head(name).size == 5
    with via_parent.open(name, 1) as f:
        assert f.read() == b"lain"
    with pytest.raises(StorageError) as err:
        list(via_parent.list())
    assert err.value.code == "NotImplemented"
    dead = http_storage(f"http://127.0.0.1:{closed_port()}/x/y?token=SECRETSIG", connect_timeout=2)
    with pytest.raises(StorageError) as err:
        dead.head("y")
    assert (err.value.code, err.value.retryable) == ("ConnectionRefused", True)
    assert "SECRETSIG" not in str(err.value) + dead.describe()
