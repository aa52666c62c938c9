"""Objects whose ETag is no MD5 (issue 10): AWS documents that SSE-KMS and SSE-C objects have
ETags that are not the MD5 of their data; OSS says the same of appendable objects. A proxy in
front of moto (or the OSS shim) answers as AWS does for a bucket with default KMS encryption (as
OSS does for appendable objects): every ETag (headers, listings, CompleteMultipartUpload and
CopyObject results, parts) is replaced by 32 hex digits that are not the MD5, and object answers
say `x-amz-server-side-encryption: aws:kms` (`x-oss-object-type: Appendable`). Uploads,
downloads, no-op syncs and `verify --checksum` must all succeed with nothing deleted; a corrupted
download is still caught where the object carries a checksum (S3: its MD5 in metadata; OSS:
CRC64)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Backend
from helpers import digests, md5s, run_cli, run_json, tree, via, write_tree
from servers.faultproxy import FaultProxy, Headers

MiB = 1024 * 1024
SIZES = ("--multipart-threshold", "10m", "--part-size", "5m")
_HEX = "0123456789abcdef"
_ETAG_HEADER = re.compile(r'^"?([0-9a-fA-F]{32})(-\d+)?"?$')
_ETAG_XML = re.compile(rb"(<ETag>(?:&quot;|\")?)([0-9a-fA-F]{32})")


def _shift(digits: str, by: int) -> str:
    """Every hex digit moved by `by` (mod 16): 32 hex digits that look like an MD5 and are not
    the content's, and that the proxy can turn back into the real ETag."""
    return "".join(_HEX[(int(c, 16) + by) % 16] for c in digits.lower())


# what object answers say about the object, per backend
OBJECT_HEADERS = {
    "s3-moto": [("x-amz-server-side-encryption", "aws:kms"),
                ("x-amz-server-side-encryption-aws-kms-key-id", "arn:aws:kms:us-east-1:1:key/test")],
    "oss": [("x-oss-object-type", "Appendable")],
}


class NoMd5Etags:
    """Answers for objects whose ETags are no MD5, made from the server's."""

    def __init__(self, object_headers: Headers) -> None:
        self.object_headers = object_headers
        self.corrupt = ""  # a regex of object paths whose GET bodies get one byte flipped

    def request(self, method: str, query: str, body: bytes) -> bytes:
        if method == "POST" and "uploadId=" in query:  # CompleteMultipartUpload names part ETags
            return _ETAG_XML.sub(lambda m: m[1] + _shift(m[2].decode(), -1).encode(), body)
        return body

    def response(self, method: str, path: str, headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        shaped: Headers = []
        for k, v in headers:
            m = _ETAG_HEADER.match(v) if k.lower() == "etag" else None
            if m:
                shaped.append((k, f'"{_shift(m[1], 1)}{m[2] or ""}"'))
            elif k.lower() != "x-oss-object-type":
                shaped.append((k, v))
        if path.count("/") >= 2 and method != "DELETE":  # an object, not the bucket
            shaped += self.object_headers
        body = _ETAG_XML.sub(lambda m: m[1] + _shift(m[2].decode(), 1).encode(), body)
        if self.corrupt and method == "GET" and re.search(self.corrupt, path) and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return shaped, body


@pytest.fixture(params=list(OBJECT_HEADERS))
def shaped(request: pytest.FixtureRequest, backend_factory: Any) -> Iterator[tuple[Backend, FaultProxy, NoMd5Etags]]:
    b = backend_factory(request.param)
    shape = NoMd5Etags(OBJECT_HEADERS[request.param])
    port = b.handle.port if b.name == "s3-moto" else b.handle.shim.port
    proxy = FaultProxy("127.0.0.1", port, shape_request=shape.request,
                       shape_response=shape.response).start()
    try:
        yield b, proxy, shape
    finally:
        proxy.stop()


def files() -> dict[str, bytes]:
    out = tree(seed=21)
    rnd = random.Random(21)
    out["large/multi.bin"] = rnd.randbytes(12 * MiB)  # multipart: 5 + 5 + 2 MiB
    out["large/single.bin"] = rnd.randbytes(9 * MiB)  # a single PUT that streams (above 8 MiB)
    return out


def local_md5s(root: Path) -> dict[str, str]:
    return md5s({p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()})


def test_round_trip(shaped: tuple[Backend, FaultProxy, NoMd5Etags], tmp_path: Path) -> None:
    b, proxy, _ = shaped
    data = files()
    src, back = tmp_path / "src", tmp_path / "back"
    write_tree(src, data)
    root = b.new_root()
    bucket = via(b.address(root), proxy)

    # the proxy answers as AWS does: no ETag is the MD5 of its object
    up = run_json(*SIZES, "cp", f"{src}/", bucket)
    assert (up["copied"], up["failed"]) == (len(data), 0), up["_stderr"]
    st = b.storage(root)  # moto itself, not through the proxy
    assert digests(st) == md5s(data), "an object that arrived was deleted or differs"
    if b.name == "s3-moto":
        for key in ("large/multi.bin", "large/single.bin"):  # their MD5, kept as rclone keeps it
            assert st.head(key).checksums == {"md5": md5s(data)[key]}

    noop = run_json(*SIZES, "sync", f"{src}/", bucket)
    assert (noop["copied"], noop["skipped"], noop["failed"]) == (0, len(data), 0), noop["_stderr"]

    down = run_json(*SIZES, "sync", bucket, f"{back}/")
    assert (down["copied"], down["failed"]) == (len(data), 0), down["_stderr"]
    assert local_md5s(back) == md5s(data)
    noop = run_json(*SIZES, "sync", bucket, f"{back}/")
    assert (noop["copied"], noop["skipped"], noop["failed"]) == (0, len(data), 0), noop["_stderr"]

    for a, z in ((f"{src}/", bucket), (bucket, f"{back}/")):
        check = run_json("--checksum", "verify", a, z)
        assert (check["identical"], check["differ"], check["missing"], check["errors"]) == (len(data), 0, 0, 0), \
            check["_stderr"]
    assert digests(st) == md5s(data)


def test_a_download_that_differs_from_the_stored_checksum_fails(shaped: tuple[Backend, FaultProxy, NoMd5Etags],
                                                             tmp_path: Path) -> None:
    """The ETag says nothing here, the md5chksum metadata (OSS: CRC64) still does: a large
    (ranged) and a whole download of bytes that are not the object's fail and leave no file."""
    b, proxy, shape = shaped
    data = {"large/multi.bin": files()["large/multi.bin"], "ok.txt": b"fine"}
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, data)
    root = b.new_root()
    bucket = via(b.address(root), proxy)
    assert run_cli(*SIZES, "cp", f"{src}/", bucket).returncode == 0
    shape.corrupt = r"/large/multi\.bin$"
    for sizes in (SIZES, ("--multipart-threshold", "100m")):  # ranged, then one whole GET
        proc = run_cli("--json", *sizes, "cp", bucket, f"{dst}/")
        assert proc.returncode == 1, proc.stderr
        assert "FAILED large/multi.bin: CHECKSUM_NOT_MATCH" in proc.stderr, proc.stderr
        assert local_md5s(dst) == md5s({"ok.txt": b"fine"})
