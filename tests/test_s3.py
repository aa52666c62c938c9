"""S3Storage against real servers: moto (faithful S3 semantics) and a Ceph RADOS Gateway (a
production S3 implementation that checks signatures and Content-MD5)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import Backend

from ossimport.address import parse_address
from ossimport.errors import NotFound, StorageError
from ossimport.storage import StorageOptions, open_storage
from ossimport.storage.s3 import S3Storage, resolve_endpoint

MiB = 1024 * 1024
SERVERS = ["s3-moto", "s3-ceph"]


@pytest.fixture(params=SERVERS)
def s3(request: pytest.FixtureRequest, backend_factory: Any) -> Backend:
    return backend_factory(request.param)


def storage(b: Backend, root: str | None = None) -> S3Storage:
    st = b.storage(root or b.new_root())
    assert isinstance(st, S3Storage)
    return st


def open_address(address: str, **options: Any) -> S3Storage:
    st = open_storage(parse_address(address), StorageOptions(**options))
    assert isinstance(st, S3Storage)
    return st


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


KEYS = {
    "a.txt": b"alpha",
    "dir/ü-ñ 文件.bin": os.urandom(3000),
    "dir/sub/z%2F+&=?.txt": b"odd characters",
    "dir/emoji-\U0001f600": b"",
    "dirx": b"sorts after dir/ in byte order",
}


def test_round_trip_unicode_keys(s3: Backend) -> None:
    st = storage(s3)
    before = time.time()
    for key, data in KEYS.items():
        entry = st.put(key, io.BytesIO(data), len(data), mtime=1_600_000_000.5)
        assert (entry.key, entry.size, entry.etag) == (key, len(data), md5(data))
        assert before - 5 <= entry.mtime <= time.time() + 5

    listed = list(st.list())
    assert [e.key for e in listed] == sorted(KEYS, key=lambda k: k.encode())
    for e in listed:
        head = st.head(e.key)
        assert (head.size, head.etag) == (len(KEYS[e.key]), md5(KEYS[e.key]))
        assert e.size == head.size and e.etag == head.etag
        assert e.mtime == head.mtime  # list (ms) and head (s) agree: both whole seconds
        assert before - 5 <= e.mtime <= time.time() + 5  # LastModified, not the mtime we sent
        with st.open(e.key) as f:
            assert f.read() == KEYS[e.key]

    assert [e.key for e in st.list("dir/")] == ["dir/emoji-\U0001f600", "dir/sub/z%2F+&=?.txt", "dir/ü-ñ 文件.bin"]
    assert [e.key for e in st.list(start_after="dir/sub/z%2F+&=?.txt")] == ["dir/ü-ñ 文件.bin", "dirx"]
    assert [e.key for e in st.list("dir/", start_after="a")] == [e.key for e in st.list("dir/")]

    # The mtime is kept as metadata (informative, like rclone) and the key lands under the root.
    raw = st._client.head_object(Bucket=st.bucket, Key=st.root + "a.txt")
    assert float(raw["Metadata"]["mtime"]) == 1_600_000_000.5

    data = KEYS["dir/ü-ñ 文件.bin"]
    with st.open("dir/ü-ñ 文件.bin", 100, 2100) as f:
        assert f.read() == data[100:2100]
    with st.open("dir/ü-ñ 文件.bin", 2990) as f:
        assert f.read() == data[2990:]
    with st.open("dir/ü-ñ 文件.bin", 5, 5) as f:
        assert f.read() == b""
    with st.open("dir/ü-ñ 文件.bin", 0, 10_000) as f:  # past the end: what exists
        assert f.read() == data
    for start, end in ((3000, None), (3005, 3010)):  # starting at or past the end: nothing
        with st.open("dir/ü-ñ 文件.bin", start, end) as f:
            assert f.read() == b""

    st.delete("a.txt")
    st.delete("a.txt")  # deleting a missing key is not an error
    with pytest.raises(NotFound) as exc:
        st.head("a.txt")
    assert exc.value.code == "NoSuchKey"
    with pytest.raises(NotFound):
        st.open("a.txt")


def test_directory_markers_are_not_listed(s3: Backend) -> None:
    st = storage(s3)
    st._client.put_object(Bucket=st.bucket, Key=st.root, Body=b"")  # the root's own marker
    st._client.put_object(Bucket=st.bucket, Key=st.root + "d/", Body=b"")
    st.put("d/f", io.BytesIO(b"x"), 1)
    assert [e.key for e in st.list()] == ["d/f"]


def test_put_refuses_a_source_of_the_wrong_size(s3: Backend) -> None:
    st = storage(s3)
    for data in (b"123456", b"1234"):
        with pytest.raises(StorageError) as exc:
            st.put("k", io.BytesIO(data), 5)
        assert exc.value.code == "SIZE_NOT_MATCH"
    with pytest.raises(NotFound):
        st.head("k")


def test_multipart_upload(s3: Backend) -> None:
    st = storage(s3)
    chunks = [os.urandom(5 * MiB) for _ in range(3)] + [os.urandom(1234)]
    upload_id = st.create_multipart("big/file.bin", mtime=1_700_000_000.0)
    assert ("big/file.bin", upload_id) in list(st.list_multipart())
    numbered = list(enumerate(chunks, start=1))
    random.shuffle(numbered)  # parts arrive in any order; complete() sorts them
    with ThreadPoolExecutor(4) as pool:  # one client shared by threads
        parts = list(pool.map(lambda nc: st.upload_part("big/file.bin", upload_id, nc[0], nc[1]), numbered))
    for part in parts:
        assert part.etag == md5(chunks[part.number - 1]) and part.size == len(chunks[part.number - 1])
    entry = st.complete_multipart("big/file.bin", upload_id, parts)
    whole = b"".join(chunks)
    assert entry.size == len(whole)
    assert entry.etag is None or entry.etag.endswith("-4")  # Ceph Pacific answers an empty ETag
    head = st.head("big/file.bin")
    assert head.size == len(whole) and head.etag and head.etag.endswith("-4")
    with st.open("big/file.bin") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(whole).digest()
    with st.open("big/file.bin", 5 * MiB - 10, 10 * MiB + 10) as f:  # a range across part borders
        assert f.read() == whole[5 * MiB - 10 : 10 * MiB + 10]
    assert list(st.list_multipart()) == []


def test_abort_multipart_leaves_nothing(s3: Backend) -> None:
    st = storage(s3)
    upload_id = st.create_multipart("p/aborted")
    st.upload_part("p/aborted", upload_id, 1, os.urandom(5 * MiB))
    assert list(st.list_multipart("p/")) == [("p/aborted", upload_id)]
    assert list(st.list_multipart("q/")) == []
    st.abort_multipart("p/aborted", upload_id)
    assert list(st.list_multipart()) == []
    with pytest.raises(NotFound):
        st.head("p/aborted")
    st.abort_multipart("p/aborted", upload_id)  # already gone: idempotent


def test_server_side_copy(s3: Backend) -> None:
    st, other = storage(s3), storage(s3)
    data = os.urandom(100_000)
    st.put("src", io.BytesIO(data), len(data), mtime=1_234_567_890.0)
    entry = st.copy("src", "dst/copy")
    assert (entry.key, entry.size, entry.etag) == ("dst/copy", len(data), md5(data))
    with st.open("dst/copy") as f:
        assert f.read() == data
    assert st.same_server(other)
    entry = other.copy("src", "from-other-root", src_root=st)
    assert entry.size == len(data)
    with other.open("from-other-root") as f:
        assert f.read() == data
    with pytest.raises(NotFound):
        st.copy("missing", "x")


def test_server_side_copy_in_parts(s3: Backend) -> None:
    st = storage(s3)
    data = os.urandom(11 * MiB)
    st.put("large", io.BytesIO(data), len(data), mtime=1_234_567_890.0)
    st.copy_limit, st.copy_part_size = 0, 5 * MiB  # force the >5 GiB path: 3 UploadPartCopy parts
    entry = st.copy("large", "large-copy")
    assert entry.size == len(data)
    head = st.head("large-copy")
    assert head.size == len(data) and head.etag and head.etag.endswith("-3")
    with st.open("large-copy") as f:
        assert f.read() == data
    raw = st._client.head_object(Bucket=st.bucket, Key=st.root + "large-copy")
    assert raw["Metadata"].get("mtime") == repr(1_234_567_890.0)  # metadata travels with the copy
    assert list(st.list_multipart()) == []


def test_missing_bucket_is_not_found(s3: Backend) -> None:
    address = s3.address(s3.new_root()).replace("ossimport-test.", "no-such-bucket-xyz.", 1)
    st = open_address(address)
    with pytest.raises(NotFound) as exc:
        list(st.list())
    assert exc.value.code == "NoSuchBucket"
    port = address.rsplit(":", 1)[1].split("/")[0]
    assert "no-such-bucket-xyz" in str(exc.value) and f"127.0.0.1:{port}" in str(exc.value)
    assert "create it" in str(exc.value)
    st.close()
    st.close()  # twice is safe


def test_wrong_secret_is_refused_without_leaking_it(backend_factory: Any) -> None:
    ceph = backend_factory("s3-ceph")  # moto does not verify signatures
    secret = "WrongSecret%2FDoNotLeak99"
    rgw = ceph.handle
    address = f"s3://{rgw.access_key}:{secret}@ossimport-test.127.0.0.1:{rgw.port}/{ceph.new_root()}/"
    st = open_address(address)
    assert st.location.secret_key == "WrongSecret/DoNotLeak99"
    for call in (lambda: list(st.list()), lambda: st.put("k", io.BytesIO(b"x"), 1), lambda: st.head("k")):
        with pytest.raises(StorageError) as exc:
            call()
        assert exc.value.code in ("SignatureDoesNotMatch", "AccessDenied")
        assert not exc.value.retryable
        for text in (str(exc.value), repr(exc.value), repr(st.location), st.describe()):
            assert "DoNotLeak" not in text


def test_anonymous_cannot_read_a_private_bucket(backend_factory: Any) -> None:
    ceph = backend_factory("s3-ceph")
    st = open_address(ceph.address(ceph.new_root()), anonymous=True)
    with pytest.raises(StorageError) as exc:
        list(st.list())
    assert exc.value.code == "AccessDenied"


def test_percent_escaped_secret_is_decoded(s3: Backend) -> None:
    address = s3.address(s3.new_root())
    assert "%2F" in address
    st = open_address(address)
    assert "/" in st.location.secret_key and "%" not in st.location.secret_key
    # Ceph checks the signature, so this round trip proves the decoded secret is the right one.
    st.put("k", io.BytesIO(b"ok"), 2)
    assert st.head("k").size == 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once the socket is closed


def test_unreachable_endpoint_is_a_quick_retryable_error() -> None:
    port = closed_port()
    st = open_address(f"s3://AKIDTEST1234:SECRET%2FX1234567@bucket.127.0.0.1:{port}/p/",
                      connect_timeout=1, read_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as exc:
        list(st.list())
    assert time.monotonic() - t0 < 10  # three attempts with botocore's short back-off, not minutes
    assert exc.value.code == "ConnectionError" and exc.value.retryable
    assert f"127.0.0.1:{port}" in str(exc.value)
    assert "SECRET" not in str(exc.value)


def test_stalled_server_times_out() -> None:
    """A server that accepts but never answers: read_timeout bounds the wait."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        port = srv.getsockname()[1]
        st = open_address(f"s3://AKIDTEST1234:SECRETX1234567@bucket.127.0.0.1:{port}/",
                          connect_timeout=1, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as exc:
            st.head("k")
        assert time.monotonic() - t0 < 10
        assert exc.value.code == "ConnectionError" and exc.value.retryable


class CannedServer:
    """Answers every HTTP request on 127.0.0.1 with the same raw bytes, then closes the
    connection: a misbehaving S3 server in a few lines."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(self.response)

    def __enter__(self) -> CannedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.sock.close()
        self.thread.join(timeout=5)


def test_truncated_download_is_a_retryable_error() -> None:
    """The connection drops after 10 of 100 bytes: read() must fail, never return short data."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"x\"\r\nConnection: close\r\n\r\n"
    with CannedServer(head + b"0123456789") as srv:
        st = open_address(f"s3://AKIDTEST1234:SECRETX1234567@bucket.127.0.0.1:{srv.port}/", read_timeout=2)
        with st.open("k") as f, pytest.raises(StorageError) as exc:
            f.read()
        assert exc.value.code == "ConnectionError" and exc.value.retryable


def test_ignored_range_is_detected() -> None:
    """A server answering a ranged GET with the whole object must not be taken at its word."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
    with CannedServer(head + bytes(100)) as srv:
        st = open_address(f"s3://AKIDTEST1234:SECRETX1234567@bucket.127.0.0.1:{srv.port}/", read_timeout=2)
        with pytest.raises(StorageError) as exc:
            st.open("k", 10, 20)
        assert exc.value.code == "InvalidRange"


def test_many_threads_share_one_client(s3: Backend) -> None:
    st = storage(s3)
    blobs = {f"t/{i:03d}": os.urandom(random.randint(0, 2000)) for i in range(60)}
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda kv: st.put(kv[0], io.BytesIO(kv[1]), len(kv[1])), blobs.items()))
    assert {e.key: e.etag for e in st.list("t/")} == {k: md5(v) for k, v in blobs.items()}


@pytest.mark.parametrize(
    ("address", "endpoint", "region"),
    [
        ("cos://ak:sk@bucket1.ap-beijing.myqcloud.com/p/", "cos.ap-beijing.myqcloud.com", "ap-beijing"),
        ("cos://ak:sk@bucket1.cos.ap-guangzhou.myqcloud.com/", "cos.ap-guangzhou.myqcloud.com", "ap-guangzhou"),
        ("s3://ak:sk@b.ap-shanghai.myqcloud.com/", "cos.ap-shanghai.myqcloud.com", "ap-shanghai"),
        ("obs://b.obs.cn-north-4.myhuaweicloud.com/", "obs.cn-north-4.myhuaweicloud.com", "cn-north-4"),
        ("s3://b.s3.eu-west-1.amazonaws.com/", "s3.eu-west-1.amazonaws.com", "eu-west-1"),
        ("s3://b.s3-us-west-2.amazonaws.com/", "s3-us-west-2.amazonaws.com", "us-west-2"),
        ("s3://b.s3.cn-north-1.amazonaws.com.cn/", "s3.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("s3://b.s3.amazonaws.com/", "s3.amazonaws.com", None),
        ("ks3://b.ks3-cn-beijing.ksyuncs.com/", "ks3-cn-beijing.ksyuncs.com", "cn-beijing"),
        ("bos://b.bj.bcebos.com/", "bj.bcebos.com", "bj"),
        ("qiniu://b.s3.cn-east-1.qiniucs.com/", "s3.cn-east-1.qiniucs.com", "cn-east-1"),
        ("ufile://b.s3-cn-bj.ufileos.com/", "s3-cn-bj.ufileos.com", "cn-bj"),
        ("s3://b.aoss-internal.cn-sh-01.sensecoreapi-oss.cn/p", "aoss-internal.cn-sh-01.sensecoreapi-oss.cn",
         "cn-sh-01"),
        ("minio://10.0.0.1:9000/bucket/", "10.0.0.1:9000", None),
        ("s3://b.127.0.0.1:9000/", "127.0.0.1:9000", None),
    ],
)
def test_flavour_endpoint_rules(address: str, endpoint: str, region: str | None) -> None:
    assert resolve_endpoint(parse_address(address)) == (endpoint, region)


def test_client_settings() -> None:
    """Addressing style, region and scheme as the address and options ask (no request is sent)."""
    st = open_address("cos://ak:sk@bucket1.ap-beijing.myqcloud.com/p/", https=True, max_pool=32)
    assert st.endpoint_url == "https://cos.ap-beijing.myqcloud.com"
    cfg = st._client.meta.config
    assert (cfg.region_name, cfg.s3["addressing_style"], cfg.max_pool_connections) == ("ap-beijing", "virtual", 32)
    st = open_address("s3://ak:sk@b.127.0.0.1:9000/")
    assert st.endpoint_url == "http://127.0.0.1:9000"
    assert st._client.meta.config.s3["addressing_style"] == "path"
    assert st.same_server(open_address("s3://ak:other@c.127.0.0.1:9000/x/"))
    assert not st.same_server(open_address("s3://ak2:sk@b.127.0.0.1:9000/"))
    assert not st.same_server(open_address("s3://ak:sk@b.127.0.0.1:9001/"))
