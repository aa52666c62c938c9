"""A Qiniu bucket's download domain for tests: objects of an S3 bucket served over plain HTTP.

    with QiniuDomain(moto_endpoint, bucket, keys={AK: SK}) as domain:
        ... read http://127.0.0.1:{domain.port}/<quoted key> ...
        assert domain.gets == 3

GET/HEAD /<percent-encoded key> answers the object from the origin bucket (pulled at each request,
as a CDN pulls from its origin), with Content-Length, Last-Modified, an ETag that is no MD5 (Qiniu's
is its own hash) and single byte ranges (206 / 416). With `keys` the bucket is private, as Qiniu
documents (developer.qiniu.com/kodo/manual/1202): a request must end in `?e=DEADLINE&token=AK:SIGN`
where SIGN is urlsafe_base64(HMAC-SHA1(SK, "http://HOST/PATH?e=DEADLINE")) and DEADLINE is not past;
anything else is answered 401. `damage` makes the domain serve a bad copy of a key, as a stale or
broken CDN cache would: "truncate" (the body less its last byte, with a matching Content-Length),
"alter" (as many bytes, one of them changed) or "stale" (altered, and last modified a day before the
object: a copy of an older version).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import boto3
from backends.http import Server, byte_range, unsatisfiable


class DomainHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: Any  # a Server carrying the QiniuDomain as `.domain`

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        try:
            self.server.domain.answer(self, body=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped reading (a refused stale copy)

    def do_HEAD(self) -> None:
        self.server.domain.answer(self, body=False)


class QiniuDomain:
    def __init__(self, origin: str, bucket: str, keys: dict[str, str] | None = None) -> None:
        self.bucket = bucket
        self.keys = keys or {}  # AK -> SK; empty: a public bucket
        self.damage: dict[str, str] = {}  # full object key -> "truncate" | "alter" | "stale"
        self._origin = boto3.client("s3", endpoint_url=origin, region_name="us-east-1",
                                    aws_access_key_id="AKIDTEST1234", aws_secret_access_key="SECRET/TEST5678")
        self._lock = threading.Lock()
        self.answered: Counter[int] = Counter()  # status -> requests answered with it
        self.requests: list[tuple[str, str, str]] = []  # (method, key, Range header)
        self._server = Server(Path("."), DomainHandler)
        self._server.domain = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="qiniu-domain",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gets(self) -> int:
        """Object bodies requested (GETs that were answered with one)."""
        with self._lock:
            return sum(1 for method, _, _ in self.requests if method == "GET")

    def start(self) -> QiniuDomain:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(10)

    def __enter__(self) -> QiniuDomain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- answering ----------------------------------------------------------------------------
    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        split = urlsplit(h.path)
        key = unquote(split.path).lstrip("/")
        if self.keys and not self._signed(h.headers.get("Host", ""), split.path, split.query):
            return self._status(h, 401, b'{"error":"download token auth failed"}')
        try:
            obj = self._origin.get_object(Bucket=self.bucket, Key=key)
        except self._origin.exceptions.NoSuchKey:
            return self._status(h, 404, b'{"error":"Document not found"}')
        data = obj["Body"].read()
        kind = self.damage.get(key)
        if kind == "truncate":
            data = data[:-1]
        elif kind in ("alter", "stale"):
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        modified = obj["LastModified"].timestamp() - (86400 if kind == "stale" else 0)
        status, start, end = byte_range(h.headers.get("Range", ""), len(data))
        with self._lock:
            self.requests.append((h.command, key, h.headers.get("Range", "")))
            self.answered[status] += 1
        if status == 416:
            return unsatisfiable(h, len(data))
        h.send_response(status)
        h.send_header("Content-Length", str(end - start + 1 if data else 0))
        h.send_header("Last-Modified", email.utils.formatdate(modified, usegmt=True))
        h.send_header("ETag", '"Fq' + base64.urlsafe_b64encode(hashlib.sha1(data).digest()).decode()[:26] + '"')
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if body and data:
            h.wfile.write(data[start:end + 1])

    def _signed(self, host: str, path: str, query: str) -> bool:
        """Whether the URL carries a valid, unexpired token as the last of its parameters."""
        params = parse_qsl(query, keep_blank_values=True)
        if len(params) < 2 or params[-1][0] != "token" or params[-2][0] != "e" or not params[-2][1].isdigit():
            return False
        deadline, (ak, _, sign) = int(params[-2][1]), params[-1][1].partition(":")
        sk = self.keys.get(ak)
        if sk is None or deadline < time.time():
            return False
        signed = f"http://{host}{path}?{query.rpartition('&token=')[0]}"
        want = base64.urlsafe_b64encode(hmac.new(sk.encode(), signed.encode(), hashlib.sha1).digest()).decode()
        return hmac.compare_digest(want, sign)

    def _status(self, h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        with self._lock:
            self.answered[status] += 1
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
