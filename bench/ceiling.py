"""The fastest a bare S3 client can move big files on this host: the benchmark's `ceiling` row.

    python bench/ceiling.py [--threads 16] [--part-size 16m] upload LOCAL_DIR/ s3://BUCKET/PREFIX/
    python bench/ceiling.py [--threads 16] [--part-size 16m] download s3://BUCKET/PREFIX/ LOCAL_DIR/

Endpoint and keys come from BENCH_S3_ENDPOINT (http://127.0.0.1:PORT), BENCH_S3_ACCESS_KEY,
BENCH_S3_SECRET_KEY and BENCH_S3_REGION (default us-east-1). Standard library only, so it starts fast.

Upload: per file one multipart upload (a single PUT when the file fits in one part), its parts sent
by `--threads` threads at once, each with its own keep-alive http.client connection, the bytes read
with os.preadv into a per-thread buffer. Requests are signed with SigV4 and `UNSIGNED-PAYLOAD`:
nothing is hashed, nothing is verified (the harness checks names and sizes afterwards).
Download: ListObjectsV2, then per object parallel ranged GETs of `--part-size` bytes, each read
into a per-thread buffer and written at its offset with os.pwrite (the file is pre-sized).
This is what any real tool costs at least on the same server with the same part size and
concurrency; a tool's time over this one's is its overhead.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import http.client
import os
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

MiB = 1 << 20
READ_CHUNK = MiB  # download: bytes read from the socket per readinto (as ours reads)
UNSIGNED = "UNSIGNED-PAYLOAD"
S3NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Error(RuntimeError):
    pass


class Signer:
    """AWS Signature Version 4 for path-style requests; payloads are never hashed."""

    def __init__(self, host: str, access_key: str, secret_key: str, region: str) -> None:
        self.host, self.ak, self.sk, self.region = host, access_key, secret_key, region
        self._keys: dict[str, bytes] = {}

    def _key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            k = hmac.digest(("AWS4" + self.sk).encode(), day.encode(), "sha256")
            for part in (self.region, "s3", "aws4_request"):
                k = hmac.digest(k, part.encode(), "sha256")
            key = self._keys[day] = k
        return key

    def headers(self, method: str, path: str, query: dict[str, str]) -> dict[str, str]:
        now = datetime.datetime.now(datetime.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        canon_query = "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
        )
        hdrs = {"host": self.host, "x-amz-content-sha256": UNSIGNED, "x-amz-date": amz_date}
        signed = ";".join(hdrs)
        canon_headers = "".join(f"{k}:{v}\n" for k, v in hdrs.items())
        request = "\n".join([method, path, canon_query, canon_headers, signed, UNSIGNED])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest()]
        )
        sig = hmac.new(self._key(day), to_sign.encode(), "sha256").hexdigest()
        auth = f"AWS4-HMAC-SHA256 Credential={self.ak}/{scope}, SignedHeaders={signed}, Signature={sig}"
        return {
            "Host": self.host,
            "X-Amz-Content-Sha256": UNSIGNED,
            "X-Amz-Date": amz_date,
            "Authorization": auth,
        }


class Client:
    """One keep-alive connection per thread; every request signed."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str) -> None:
        u = urlsplit(endpoint)
        if u.scheme != "http" or not u.hostname:
            raise SystemExit(f"BENCH_S3_ENDPOINT must be http://HOST:PORT, not {endpoint!r}")
        self.hostname, self.port = u.hostname, u.port or 80
        self.signer = Signer(u.netloc, access_key, secret_key, region)
        self._local = threading.local()

    def conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            # blocking, no Python-level timeout: a timeout makes every recv/send poll first
            c = self._local.conn = http.client.HTTPConnection(self.hostname, self.port, timeout=None)
        return c

    def request(
        self,
        method: str,
        bucket: str,
        key: str = "",
        query: dict[str, str] | None = None,
        body: Any = None,
        extra: dict[str, str] | None = None,
        into: Callable[[http.client.HTTPResponse], None] | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """Send one request; `into` consumes a 2xx body itself (else the body is returned)."""
        query = query or {}
        path = "/" + quote(bucket, safe="") + ("/" + quote(key, safe="/-_.~") if key else "")
        headers = self.signer.headers(method, path, query)
        headers["Content-Length"] = str(len(body) if body is not None else 0)
        headers.update(extra or {})
        url = path + ("?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in query.items()) if query else "")  # fmt: skip
        for attempt in range(2):  # a keep-alive connection the server closed is reopened once
            c = self.conn()
            try:
                c.request(method, url, body=body, headers=headers)
                resp = c.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                c.close()
                self._local.conn = None
                if attempt:
                    raise
        if 200 <= resp.status < 300 and into is not None:
            into(resp)
            return resp, b""
        data = resp.read()
        if resp.status >= 300:
            raise S3Error(f"{method} {url}: HTTP {resp.status} {data[:300]!r}")
        return resp, data


# ----------------------------------------------------------------------------- upload


def upload_file(client: Client, pool: ThreadPoolExecutor, path: Path, bucket: str, key: str, part_size: int) -> None:  # fmt: skip
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    local = threading.local()

    def read(offset: int, n: int) -> memoryview:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(part_size)
        view = memoryview(buf)[:n]
        got = os.preadv(fd, [view], offset)
        if got != n:
            raise S3Error(f"{path}: short read at {offset} ({got} of {n} bytes)")
        return view

    try:
        if size <= part_size:
            client.request("PUT", bucket, key, body=read(0, size))
            return
        _, data = client.request("POST", bucket, key, {"uploads": ""})
        doc = ET.fromstring(data)
        upload_id = doc.findtext(f"{S3NS}UploadId") or doc.findtext("UploadId")
        if not upload_id:
            raise S3Error(f"CreateMultipartUpload answered no UploadId: {data[:300]!r}")

        def part(num: int) -> str:
            off = (num - 1) * part_size
            body = read(off, min(part_size, size - off))
            query = {"partNumber": str(num), "uploadId": upload_id}
            resp, _ = client.request("PUT", bucket, key, query, body)
            return resp.getheader("ETag") or ""

        nparts = (size + part_size - 1) // part_size
        etags = list(pool.map(part, range(1, nparts + 1)))
        parts = "".join(
            f"<Part><PartNumber>{i}</PartNumber><ETag>{e}</ETag></Part>" for i, e in enumerate(etags, 1)
        )
        xml = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>"
        _, data = client.request("POST", bucket, key, {"uploadId": upload_id}, xml.encode())
        if b"<Error>" in data:
            raise S3Error(f"CompleteMultipartUpload failed: {data[:300]!r}")
    finally:
        os.close(fd)


def walk(root: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            p = Path(dirpath) / name
            yield p, p.relative_to(root).as_posix()


# ----------------------------------------------------------------------------- download


def list_objects(client: Client, bucket: str, prefix: str) -> Iterator[tuple[str, int]]:
    token = ""
    while True:
        q = {"list-type": "2", "prefix": prefix} | ({"continuation-token": token} if token else {})
        _, data = client.request("GET", bucket, "", q)
        root = ET.fromstring(data)
        ns = S3NS if root.tag.startswith(S3NS) else ""
        for c in root.iter(f"{ns}Contents"):
            yield c.findtext(f"{ns}Key") or "", int(c.findtext(f"{ns}Size") or 0)
        token = root.findtext(f"{ns}NextContinuationToken") or ""
        if (root.findtext(f"{ns}IsTruncated") or "").lower() != "true" or not token:
            return


def download_file(client: Client, pool: ThreadPoolExecutor, bucket: str, key: str, size: int, path: Path, part_size: int) -> None:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    local = threading.local()
    try:
        os.ftruncate(fd, size)

        def rng(offset: int) -> None:
            end = min(offset + part_size, size)
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(READ_CHUNK))

            def sink(resp: http.client.HTTPResponse) -> None:
                pos = offset
                while pos < end:
                    n = resp.readinto(buf[: min(READ_CHUNK, end - pos)])
                    if not n:
                        raise S3Error(f"{key}: body ended at {pos} of {end}")
                    os.pwrite(fd, buf[:n], pos)
                    pos += n
                if resp.read(1):
                    raise S3Error(f"{key}: more bytes than the range {offset}-{end - 1}")

            client.request("GET", bucket, key, extra={"Range": f"bytes={offset}-{end - 1}"}, into=sink)

        if size:
            list(pool.map(rng, range(0, size, part_size)))
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- main


def split_s3(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise SystemExit(f"expected s3://BUCKET/PREFIX/, got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix


def size_arg(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--part-size", type=size_arg, default=16 * MiB)
    p.add_argument("op", choices=("upload", "download"))
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args(argv)
    env = os.environ
    client = Client(
        env.get("BENCH_S3_ENDPOINT", ""),
        env.get("BENCH_S3_ACCESS_KEY", ""),
        env.get("BENCH_S3_SECRET_KEY", ""),
        env.get("BENCH_S3_REGION", "us-east-1"),
    )
    with ThreadPoolExecutor(max_workers=max(1, args.threads)) as pool:
        if args.op == "upload":
            bucket, prefix = split_s3(args.dst)
            for path, rel in walk(Path(args.src)):
                upload_file(client, pool, path, bucket, prefix + rel, args.part_size)
        else:
            bucket, prefix = split_s3(args.src)
            root = Path(args.dst)
            for key, size in list(list_objects(client, bucket, prefix)):
                rel = key[len(prefix) :]
                if not rel or rel.endswith("/") or ".." in rel.split("/"):
                    continue
                download_file(client, pool, bucket, key, size, root / rel, args.part_size)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except S3Error as e:
        print(f"ceiling: {e}", file=sys.stderr)
        sys.exit(1)
