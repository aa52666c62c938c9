"""S3Storage against real servers: moto (faithful S3 semantics) and a Ceph RADOS Gateway (a
production S3 implementation that checks signatures and Content-MD5)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import random
import socket
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import Backend

from ossimport.address import parse_address
from ossimport.errors import NotFound, StorageError
from ossimport.storage import Entry, StorageOptions, open_storage
from ossimport.storage.s3 import PUT_BUFFER, S3Storage, resolve_endpoint

MiB = 1024 * 1024
SERVERS = ["s3-moto", "s3-ceph"]


@pytest.fixture(params=["lean", "boto3"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which S3 client carries the data path: every contract test runs through both, so they
    must behave alike (OSSIMPORT_S3_CLIENT=boto3 turns the lean path off)."""
    if request.param == "boto3":
        monkeypatch.setenv("OSSIMPORT_S3_CLIENT", "boto3")
    else:
        monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    return str(request.param)


@pytest.fixture(params=SERVERS)
def s3(request: pytest.FixtureRequest, backend_factory: Any, client: str) -> Backend:
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


def test_large_put_streams_and_keeps_its_md5(s3: Backend) -> None:
    """A single PUT of PUT_BUFFER bytes or more streams; an MD5 given up front goes as Content-MD5
    and stays as rclone's md5chksum metadata; without one the answer's ETag is compared after.
    A source of the wrong size or MD5 is refused before the body is complete: nothing stored."""
    st = storage(s3)
    data = os.urandom(PUT_BUFFER + 1234)
    entry = st.put("big", io.BytesIO(data), len(data), mtime=1_700_000_000.0, content_md5=md5(data))
    assert (entry.size, entry.checksums) == (len(data), {"md5": md5(data)})
    assert st.head("big").checksums == {"md5": md5(data)}
    raw = st._client.head_object(Bucket=st.bucket, Key=st.root + "big")
    assert base64.b64decode(raw["Metadata"]["md5chksum"]).hex() == md5(data)
    assert float(raw["Metadata"]["mtime"]) == 1_700_000_000.0
    with st.open("big") as f:
        assert f.read() == data
    assert st.put("big2", io.BytesIO(data), len(data)).checksums == {"md5": md5(data)}
    for body, announced, code in ((data, md5(b"other bytes"), "SOURCE_CHANGED"), (data[:-1], None, "SIZE_NOT_MATCH"),
                                  (data + b"!", None, "SIZE_NOT_MATCH")):
        with pytest.raises(StorageError) as exc:
            st.put("refused", io.BytesIO(body), len(data), content_md5=announced)
        assert exc.value.code == code
    with pytest.raises(NotFound):
        st.head("refused")


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


def test_wrong_secret_is_refused_without_leaking_it(backend_factory: Any, client: str) -> None:
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


def test_anonymous_cannot_read_a_private_bucket(backend_factory: Any, client: str) -> None:
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


def test_unreachable_endpoint_is_a_quick_retryable_error(client: str) -> None:
    port = closed_port()
    st = open_address(f"s3://AKIDTEST1234:SECRET%2FX1234567@bucket.127.0.0.1:{port}/p/",
                      connect_timeout=1, read_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as exc:
        list(st.list())
    assert time.monotonic() - t0 < 10  # three attempts with botocore's short back-off, not minutes
    assert exc.value.code == "ConnectionRefused" and exc.value.retryable
    assert f"127.0.0.1:{port}" in str(exc.value)
    assert "SECRET" not in str(exc.value)


def test_stalled_server_times_out(client: str) -> None:
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
        assert exc.value.code == "ReadTimeout" and exc.value.retryable


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


def test_truncated_download_is_a_retryable_error(client: str) -> None:
    """The connection drops after 10 of 100 bytes: read() must fail, never return short data."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"x\"\r\nConnection: close\r\n\r\n"
    with CannedServer(head + b"0123456789") as srv:
        st = open_address(f"s3://AKIDTEST1234:SECRETX1234567@bucket.127.0.0.1:{srv.port}/", read_timeout=2)
        with st.open("k") as f, pytest.raises(StorageError) as exc:
            f.read()
        assert exc.value.code == "ConnectionError" and exc.value.retryable


def test_ignored_range_is_detected(client: str) -> None:
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


# ---- the lean data path ------------------------------------------------------------------------
def answer(status: str = "200 OK", headers: dict[str, str] | None = None, body: bytes = b"",
           chunked: bool = False) -> bytes:
    """One raw HTTP/1.1 answer."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]) if c) + b"0\r\n\r\n"
    else:
        if "Content-Length" not in (headers or {}):
            lines.append(f"Content-Length: {len(body)}")
        framed = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + framed


class ScriptedServer:
    """An HTTP/1.1 server on 127.0.0.1 that answers requests with the scripted raw answers in
    order (the last one repeats) and records every request (method, target, headers, body).
    Connections are kept open between requests unless `close_each`; `tls` wraps them in TLS."""

    def __init__(self, answers: list[bytes], *, close_each: bool = False, tls: Any = None) -> None:
        self.answers, self.close_each, self.tls = answers, close_each, tls
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(10)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            f = conn.makefile("rb")
            while line := f.readline():
                method, target, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = f.read(int(headers.get("content-length", 0)))
                with self._lock:
                    self.requests.append((method, target, headers, body))
                    reply = self.answers[min(len(self.requests), len(self.answers)) - 1]
                if method == "HEAD":  # the headers of the answer, never its body
                    reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                conn.sendall(reply)
                if self.close_each:
                    return

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


HEAD_OK = answer(headers={"ETag": '"5D41402ABC4B2A76B9719D911017C592"',
                          "Last-Modified": "Tue, 14 Nov 2023 22:13:20 GMT", "Content-Length": "5"})


def scripted(port: int, root: str = "p/", **options: Any) -> S3Storage:
    return open_address(f"s3://AKIDTEST1234:SECRET%2FDoNotLeak@bucket.127.0.0.1:{port}/{root}", **options)


def test_lean_path_carries_the_data_and_boto3_is_not_loaded(backend_factory: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    st = storage(backend_factory("s3-moto"))
    assert st._lean is not None
    st.put("a", io.BytesIO(b"abc"), 3)
    assert [e.key for e in st.list()] == ["a"]
    assert st.head("a").size == 3
    with st.open("a") as f:
        assert f.read() == b"abc"
    st.copy("a", "b", size=3)
    st.delete("a")
    upload_id = st.create_multipart("m", mtime=1.0)
    assert list(st.list_multipart()) == [("m", upload_id)]
    part = st.upload_part("m", upload_id, 1, b"xyz")
    assert st.complete_multipart("m", upload_id, [part]).size == 3
    st.abort_multipart("gone", st.create_multipart("gone"))
    assert list(st.list_multipart()) == []
    assert st._boto is None  # created only where the lean path does not go
    monkeypatch.setenv("OSSIMPORT_S3_CLIENT", "boto3")
    assert storage(backend_factory("s3-moto"))._lean is None


@pytest.mark.parametrize("server", SERVERS)
def test_both_clients_see_the_same(server: str, backend_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries and errors do not depend on which client sent the request."""
    b = backend_factory(server)
    root = b.new_root()
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    lean = storage(b, root)
    monkeypatch.setenv("OSSIMPORT_S3_CLIENT", "boto3")
    boto = storage(b, root)
    assert lean._lean is not None and boto._lean is None
    for key, data in KEYS.items():
        (lean if len(data) % 2 else boto).put(key, io.BytesIO(data), len(data), mtime=1_600_000_000.0)
    assert list(lean.list()) == list(boto.list())
    assert list(lean.list("dir/", start_after="dir/emoji")) == list(boto.list("dir/", start_after="dir/emoji"))
    for key in KEYS:
        assert lean.head(key) == boto.head(key)
    one, two = lean.copy("a.txt", "copies/1"), boto.copy("a.txt", "copies/2")
    assert (one.size, one.etag) == (two.size, two.etag) == (5, md5(b"alpha"))

    def failure(call: Any) -> tuple[type, str, bool, str]:
        with pytest.raises(StorageError) as exc:
            call()
        return type(exc.value), exc.value.code, exc.value.retryable, str(exc.value)

    for make in (lambda st: lambda: st.head("missing"), lambda st: lambda: st.open("missing"),
                 lambda st: lambda: st.open("missing", 10, 20)):
        assert failure(make(lean)) == failure(make(boto))
    # the same address with a bucket that does not exist, through each client
    address = b.address(b.new_root()).replace("ossimport-test.", "no-such-bucket-xyz.", 1)
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT")
    gone_lean = open_address(address)
    monkeypatch.setenv("OSSIMPORT_S3_CLIENT", "boto3")
    gone_boto = open_address(address)
    for make in (lambda st: lambda: list(st.list()), lambda st: lambda: st.put("k", io.BytesIO(b"x"), 1),
                 lambda st: lambda: st.head("k")):
        assert failure(make(gone_lean)) == failure(make(gone_boto))
    for st in (lean, boto, gone_lean, gone_boto):
        st.close()


def test_put_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Content-MD5, the mtime metadata, the escaped key and a SigV4 header that names them; the
    answer's ETag (quoted, any case) and Date make the entry; the secret never travels."""
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    ok = answer(headers={"ETag": '"5D41402ABC4B2A76B9719D911017C592"', "Date": "Tue, 14 Nov 2023 22:13:20 GMT"})
    with ScriptedServer([ok]) as srv:
        st = scripted(srv.port)
        entry = st.put("dir/ü k+%.bin", io.BytesIO(b"hello"), 5, mtime=1_700_000_000.25)
        assert entry == Entry("dir/ü k+%.bin", 5, 1_700_000_000.0, "5d41402abc4b2a76b9719d911017c592",
                              {"md5": md5(b"hello")})  # what Content-MD5 made the server check
        method, target, headers, body = srv.requests[0]
    assert (method, target, body) == ("PUT", "/bucket/p/dir/%C3%BC%20k%2B%25.bin", b"hello")
    assert headers["content-md5"] == base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    assert headers["x-amz-meta-mtime"] == repr(1_700_000_000.25)
    assert headers["content-length"] == "5" and headers["host"] == f"127.0.0.1:{srv.port}"
    auth = headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST1234/") and "/us-east-1/s3/aws4_request" in auth
    assert "SignedHeaders=content-md5;host;x-amz-content-sha256;x-amz-date;x-amz-meta-mtime," in auth
    assert not any("DoNotLeak" in v for v in (*headers.values(), target))


def test_virtual_hosted_and_path_style_addressing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    with ScriptedServer([HEAD_OK]) as srv:
        st = open_address(f"s3://AKIDTEST1234:SECRETX1234567@bkt.s3.example.test:{srv.port}/p/")
        assert st._lean is not None and st.addressing_style == "virtual"
        st._lean._addr = ("127.0.0.1", srv.port)  # no DNS here: the name is only the Host header
        assert st.head("a b") == Entry("a b", 5, 1_700_000_000.0, "5d41402abc4b2a76b9719d911017c592",
                                       {"md5": "5d41402abc4b2a76b9719d911017c592"})  # no SSE-KMS: an MD5
        path_style = scripted(srv.port)
        path_style.head("a b")
    (_, target, headers, _), (_, target2, headers2, _) = srv.requests
    assert (target, headers["host"]) == ("/p/a%20b", f"bkt.s3.example.test:{srv.port}")
    assert (target2, headers2["host"]) == ("/bucket/p/a%20b", f"127.0.0.1:{srv.port}")


def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The lean client's retry back-offs, recorded instead of slept."""
    from ossimport.storage import s3wire

    slept: list[float] = []
    clock = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    monkeypatch.setattr(s3wire, "time", types.SimpleNamespace(**{**clock, "sleep": slept.append}))
    return slept


def test_a_pooled_connection_the_server_closed_is_replaced_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    slept = backoffs(monkeypatch)
    with ScriptedServer([HEAD_OK], close_each=True) as srv:  # keep-alive answers, then hangs up
        st = scripted(srv.port)
        for _ in range(3):
            assert st.head("k").size == 5
    assert slept == []  # no back-off: a fresh connection, not a retry
    assert len(srv.requests) == 3 and srv.connections == 3


@pytest.mark.parametrize("client", ["lean", "boto3"], indirect=True)
def test_throttling_and_5xx_are_retried(client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = answer("503 Slow Down", {"Content-Type": "application/xml"},
                  b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>")
    with ScriptedServer([slow, HEAD_OK]) as srv:
        assert scripted(srv.port).head("k").size == 5
    assert len(srv.requests) == 2
    broken = answer("500 Internal Server Error", {"Content-Type": "application/xml"},
                    b"<Error><Code>InternalError</Code><Message>We encountered an internal error</Message></Error>")
    slept = backoffs(monkeypatch)
    with ScriptedServer([broken]) as srv:
        with pytest.raises(StorageError) as exc:
            list(scripted(srv.port).list())
        assert exc.value.code == "InternalError" and exc.value.retryable and "internal error" in str(exc.value)
    if client == "lean":  # a 5xx is retried after tens of milliseconds (jittered), throttling after ~1 s
        assert len(slept) == 3 and all(0 <= s <= 0.05 * 2**i for i, s in enumerate(slept)), slept
    assert len(srv.requests) == 4  # botocore counts max_attempts=3 as retries: 4 tries


def test_chunked_paged_url_encoded_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    ns = "http://s3.amazonaws.com/doc/2006-03-01/"

    def page(keys: list[str], token: str | None) -> bytes:
        contents = "".join(
            f"<Contents><Key>{k}</Key><LastModified>2023-11-14T22:13:20.500Z</LastModified>"
            f"<ETag>&quot;ABC&quot;</ETag><Size>{0 if k.endswith('/') else len(k)}</Size></Contents>" for k in keys
        )
        more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>" if token \
            else "<IsTruncated>false</IsTruncated>"
        return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{ns}"><Name>bucket</Name>'
                f"<EncodingType>url</EncodingType>{more}{contents}</ListBucketResult>").encode()

    first = answer(body=page(["p/a%20b", "p/c%2Bd", "p/dir/"], "tok 1/+"), chunked=True)
    second = answer(body=page(["p/%C3%A9", "p/z"], None))
    with ScriptedServer([first, second]) as srv:
        entries = list(scripted(srv.port).list(start_after="a"))
    assert [(e.key, e.size, e.mtime, e.etag) for e in entries] == [
        ("a b", 7, 1_700_000_000.0, "abc"), ("c+d", 7, 1_700_000_000.0, "abc"),
        ("é", 8, 1_700_000_000.0, "abc"), ("z", 3, 1_700_000_000.0, "abc"),
    ]  # the directory marker p/dir/ is left out
    (_, t1, _, _), (_, t2, _, _) = srv.requests
    assert t1 == "/bucket?encoding-type=url&list-type=2&prefix=p%2F&start-after=p%2Fa"
    assert "continuation-token=tok%201%2F%2B" in t2


def test_truncated_chunked_body_is_a_retryable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    broken = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n64\r\n0123456789"
    with ScriptedServer([broken], close_each=True) as srv:
        st = scripted(srv.port, read_timeout=2)
        with st.open("k") as f, pytest.raises(StorageError) as exc:
            f.read()
    assert exc.value.code == "ConnectionError" and exc.value.retryable


def self_signed_certificate(tmp_path: Any) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ossimport test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.parametrize("client", ["lean", "boto3"], indirect=True)
def test_https_checks_the_certificate(client: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    cert, key = self_signed_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with ScriptedServer([HEAD_OK], tls=tls) as srv:
        monkeypatch.setenv("AWS_CA_BUNDLE", cert)
        st = scripted(srv.port, https=True)
        assert st.endpoint_url == f"https://127.0.0.1:{srv.port}"
        assert st.head("k").etag == "5d41402abc4b2a76b9719d911017c592"
        monkeypatch.delenv("AWS_CA_BUNDLE")
        untrusted = scripted(srv.port, https=True)
        with pytest.raises(StorageError) as exc:
            untrusted.head("k")
    assert exc.value.code == "SSLError" and not exc.value.retryable
    assert len(srv.requests) == 1


def test_a_wrong_region_answer_hands_the_storage_to_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore follows wrong-region redirects (S3RegionRedirector); the lean path does not, so
    such an answer moves the storage to boto3 and the call is made again there."""
    monkeypatch.delenv("OSSIMPORT_S3_CLIENT", raising=False)
    wrong = answer("400 Bad Request", {"Content-Type": "application/xml"}, (
        b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region 'us-east-1' is wrong; "
        b"expecting 'eu-west-1'</Message><Region>eu-west-1</Region></Error>"))
    listing = answer(body=b'<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>p/k</Key>'
                          b'<LastModified>2023-11-14T22:13:20Z</LastModified><ETag>"ab"</ETag><Size>1</Size>'
                          b"</Contents></ListBucketResult>")
    with ScriptedServer([wrong, listing]) as srv:
        st = scripted(srv.port)
        assert [(e.key, e.size, e.etag) for e in st.list()] == [("k", 1, "ab")]
        assert st._lean is None and st._boto is not None
    assert "amz-sdk-invocation-id" in srv.requests[1][2]  # the second request came from botocore


@pytest.mark.parametrize("client", ["lean", "boto3"], indirect=True)
def test_a_body_that_stalls_times_out(client: str) -> None:
    """Headers, 10 of 100 bytes, then silence with the connection open: the read ends with a
    retryable error after the read timeout, never with short data and never hanging."""
    release = threading.Event()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    release.wait(10)

        threading.Thread(target=serve, daemon=True).start()
        st = open_address(f"s3://AKIDTEST1234:SECRETX1234567@bucket.127.0.0.1:{srv.getsockname()[1]}/",
                          read_timeout=0.5)
        t0 = time.monotonic()
        try:
            with st.open("k") as f, pytest.raises(StorageError) as exc:
                f.read()
        finally:
            release.set()
        # the server holds the connection open until the read gave up: a ReadTimeout (not the
        # ConnectionError of a connection the server closed) means the timeout ended it
        assert time.monotonic() - t0 >= 0.4
        assert exc.value.code == "ReadTimeout" and exc.value.retryable


@pytest.mark.parametrize("client", ["lean", "boto3"], indirect=True)
def test_a_bucket_with_dots_in_path_style_addresses(client: str, backend_factory: Any, tmp_path: Any) -> None:
    """A dotted bucket cannot follow the BUCKET.ENDPOINT rule (the endpoint starts at the first
    '.'), but where the endpoint is an IP or localhost, or in minio://HOST:PORT/BUCKET/, the
    bucket is a path segment and its dots are unambiguous."""
    import boto3
    from helpers import run_json, write_tree

    b = backend_factory("s3-moto")
    bucket = f"my.data.{client}"
    boto3.client("s3", endpoint_url=b.handle.endpoint, region_name="us-east-1", aws_access_key_id="AKIDTEST1234",
                 aws_secret_access_key="SECRET/TEST5678").create_bucket(Bucket=bucket)
    creds = "AKIDTEST1234:SECRET%2FTEST5678"
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"alpha", "d/b.txt": b"beta"})
    for address in (f"s3://{creds}@{bucket}.127.0.0.1:{b.handle.port}/one/",
                    f"minio://{creds}@127.0.0.1:{b.handle.port}/{bucket}/two/"):
        assert run_json("cp", f"{src}/", address)["copied"] == 2
        st = open_address(address)
        assert (st.bucket, sorted(e.key for e in st.list())) == (bucket, ["a.txt", "d/b.txt"])


class _Sent(Exception):
    """Raised by a stand-in for the socket exchange: the request head that would have been sent."""

    def __init__(self, head: bytes) -> None:
        super().__init__("captured")
        self.head = head


AWKWARD_KEYS = ["plain.txt", "a b/c d", "ü/文件 名", "a+b=c&d", "100%", "tilde~star*", "(x)!'$,;:@", "a//b",
                "./dot/../x", "q?x=1#frag", "emoji 😀", "dir/", "tab\tand\nnewline", "back\\slash", "^`{|}[]\"<>"]


@pytest.mark.parametrize("path_style", [True, False], ids=["path", "virtual"])
@pytest.mark.parametrize("token", ["", "FwoGZXIvYXdzEJr//token+/="], ids=["keys", "session"])
def test_signatures_equal_botocores(path_style: bool, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean client's SigV4 signature of every request shape, over awkward keys and query
    values, equals the one botocore's S3 signer computes from the request as sent on the wire
    (method, target, headers), as a server does: the canonical request and the signature, not
    just the shape of the header."""
    import datetime
    from urllib.parse import parse_qsl, quote, unquote

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from ossimport.storage.s3wire import WireClient

    client = WireClient(secure=False, netloc="127.0.0.1:9000", bucket="my-bkt", path_style=path_style,
                        region="eu-central-1", access_key="AKIDEXAMPLE", secret_key="wJalr/XUtnFEMI+K7MDENG=",
                        token=token, connect_timeout=1, read_timeout=1, max_idle=1)

    def capture(method: str, head: bytes, body: bytes, stream: bool) -> Any:
        raise _Sent(head)

    monkeypatch.setattr(client, "_exchange", capture)
    requests: list[tuple[str, str | None, dict[str, Any]]] = []
    for key in AWKWARD_KEYS:
        requests += [
            ("GET", key, {}), ("HEAD", key, {}), ("DELETE", key, {}),
            ("PUT", key, {"headers": {"content-md5": "XUFAKrxLKna5cZ2REBfFkg==", "x-amz-meta-mtime": "1.5"},
                          "body": b"hello"}),
            ("PUT", key, {"headers": {"x-amz-copy-source": quote(f"my-bkt/{key}", safe="/~")}}),  # as s3.py
            ("POST", key, {"query": {"uploads": None}}),
            ("PUT", key, {"query": {"partNumber": "7", "uploadId": "2~a/b+c= d"}, "body": b"part"}),
            ("GET", None, {"query": {"list-type": "2", "prefix": key, "start-after": key + "z",
                                     "continuation-token": "1/+= tok", "encoding-type": "url"}}),
        ]
    for method, key, kwargs in requests:
        with pytest.raises(_Sent) as sent:
            client.request(method, key, **kwargs)
        request_line, *header_lines = sent.value.head.decode("latin-1").split("\r\n")
        verb, target, _ = request_line.split(" ")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        ours = headers.pop("authorization")
        # a server signs what SignedHeaders names; everything S3 reads from the request is there
        signed = ours.partition("SignedHeaders=")[2].partition(",")[0].split(";")
        assert {n for n in headers if n.startswith("x-amz-") or n in ("host", "content-md5")} <= set(signed)
        stamp = datetime.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda stamp=stamp: stamp)
        # what a server reads: the decoded path and query parameters, encoded again by the rules
        # of SigV4 (RFC 3986 unreserved characters kept, everything else %XX; '/' kept in paths)
        path, _, query = target.partition("?")
        wire = AWSRequest(method=verb, url=f"http://{headers['host']}{quote(unquote(path), safe='/~')}",
                          params=parse_qsl(query, keep_blank_values=True),
                          headers={n: headers[n] for n in signed}, data=kwargs.get("body", b""))
        signer = botocore.auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalr/XUtnFEMI+K7MDENG=", token or None),
                                           "s3", "eu-central-1")
        # as a server does, take the payload hash the request declares (botocore would hash the body)
        signer.payload = lambda request, declared=headers["x-amz-content-sha256"]: declared  # type: ignore[method-assign]
        signer.add_auth(wire)
        assert ours == wire.headers["Authorization"], (
            f"{method} {key!r}: botocore's canonical request is\n{signer.canonical_request(wire)}")
