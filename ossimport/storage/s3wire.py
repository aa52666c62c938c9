"""A lean S3 client: SigV4 signed by hand, sent over pooled keep-alive HTTP/1.1 sockets.

Why it exists: boto3 costs ~1.4 ms of CPU per request (building the request, its event hooks,
signing, urllib3 and http.client); this client ~0.15 ms (measured in issue 5). With small files
that per-request CPU, not the network, decides throughput on a few cores, so the S3 data path
(`ossimport.storage.s3`) sends its requests here and leaves the rest to boto3.

What is here: `WireClient` (signing, the connection pool, retries with back-off), `Connection`
(one socket with a buffered reader), `Response` (our own HTTP/1.1 answer parsing: status line,
headers, Content-Length, chunked or close-delimited bodies), the XML helpers that read S3's
answers, and the errors: `ServerError` for an error answer (status, S3 code, message, as
botocore's ClientError carries them) and `BadAnswer` / `Disconnected` (ConnectionError, so
OSError) for an answer that broke off or is not HTTP.

This module knows nothing about the Storage contract: keys are the bucket's full keys, answers
are raw headers and bytes, and turning failures into StorageError is the caller's business.
Importing it loads only the standard library; ssl, certifi, http and email.utils are imported
when first needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import math
import os
import random
import socket
import struct
import sys
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

__all__ = [
    "RETRYABLE", "S3_NS", "BadAnswer", "ConnectTimeout", "Connection", "Disconnected", "Response", "ServerError", "WireClient",
    "answer_fields", "ca_bundle", "child_texts", "date_seconds", "error_from_answer", "is_tls_error",
    "iso_seconds", "local_name", "md5_b64", "split_host_port", "whole_seconds", "xml_escape", "xml_root",
]

# S3 error codes (and statuses, for status-only answers) worth retrying.
RETRYABLE = {
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeoutException",
    "500", "502", "503", "504", "429",
}
# Throttling asks for patience: WireClient backs off from 1 s for these, from 50 ms otherwise.
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable", "429", "503"}
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_USER_AGENT = "user-agent: ossimport"
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                                       "Dec"), start=1)}
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


# ---- errors -----------------------------------------------------------------------------------
class BadAnswer(ConnectionError):
    """The server's answer broke off or is not HTTP: a transport failure, retried like one."""


class Disconnected(BadAnswer):
    """The connection was closed before any answer (a pooled connection the server dropped)."""


class ConnectTimeout(TimeoutError):
    """No connection within the connect timeout (a read timeout is a plain TimeoutError)."""


class ServerError(Exception):
    """An error answer from the server: what botocore's ClientError carries (status, S3 code,
    message). Status-only answers (HEAD) carry the status as the code, as botocore does."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status, self.code, self.message = status, code, message


# ---- HTTP/1.1 ---------------------------------------------------------------------------------
class Connection:
    """One keep-alive HTTP/1.1 connection (plain or TLS) with a buffered reader over it.

    A plain connection is a blocking socket whose read and write timeouts are the kernel's
    (SO_RCVTIMEO/SO_SNDTIMEO): a Python socket timeout polls before every recv and send, two
    more system calls per request, and each releases the GIL the copy threads contend for. A
    kernel timeout ends a read early without an error, so a short read that took the whole
    timeout is reported as the timeout it is (`kernel_timeout`); TLS keeps Python's timeouts."""

    __slots__ = ("sock", "fp", "kernel_timeout")

    def __init__(self, sock: socket.socket, kernel_timeout: float | None = None) -> None:
        self.sock = sock
        self.fp = sock.makefile("rb", 65536)
        self.kernel_timeout = kernel_timeout

    def readline(self) -> bytes:
        started = time.monotonic()
        line = self.fp.readline(65537)
        if not line.endswith(b"\n"):
            self._check_timeout(started)
        return line

    def read(self, size: int) -> bytes:
        started = time.monotonic()
        data = self.fp.read(size)
        if data is None:
            # the buffered reader's answer when the kernel timeout ends a recv before any byte
            # arrived (EAGAIN on a blocking socket): nothing else makes it return None
            raise TimeoutError("timed out")
        if len(data) < size:
            self._check_timeout(started)
        return data

    def _check_timeout(self, started: float) -> None:
        if self.kernel_timeout and time.monotonic() - started >= self.kernel_timeout * 0.9:
            raise TimeoutError("timed out")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fp.close()
        with contextlib.suppress(OSError):
            self.sock.close()


class Response:
    """An answer: status, headers (lower-case names) and the body, read with its framing
    (Content-Length, chunked, or up to the close). A body that ends early raises BadAnswer,
    never returns short. Once the body is read whole the connection goes back to the pool."""

    __slots__ = ("status", "headers", "_client", "_conn", "_left", "_chunked", "_close", "_done")

    def __init__(self, client: WireClient, conn: Connection, method: str) -> None:
        self._client, self._conn = client, conn
        while True:
            line = conn.readline()
            if not line:
                raise Disconnected("the server closed the connection without an answer")
            version, _, rest = line.partition(b" ")
            try:
                status = int(rest[:3])
            except ValueError:
                raise BadAnswer(f"not an HTTP status line: {line[:100]!r}") from None
            if not version.startswith(b"HTTP/"):
                raise BadAnswer(f"not an HTTP status line: {line[:100]!r}")
            headers: dict[str, str] = {}
            for _ in range(200):
                h = conn.readline()
                if h in (b"\r\n", b"\n"):
                    break
                if not h:
                    raise BadAnswer("the answer ended early")
                name, sep, value = h.partition(b":")
                if sep:
                    headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            else:
                raise BadAnswer("too many headers")
            if not 100 <= status < 200:  # skip interim answers (100 Continue)
                break
        self.status, self.headers = status, headers
        connection = headers.get("connection", "").lower()
        self._close = "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection)
        self._chunked = False
        self._left: int | None
        if method == "HEAD" or status in (204, 304):
            self._left = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._left, self._chunked = 0, True
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise BadAnswer("invalid Content-Length") from None
        else:
            self._left, self._close = None, True  # the body ends when the server closes
        self._done = False
        if self._left == 0 and not self._chunked:
            self._finish()

    def read(self, size: int | None = None) -> bytes:
        """Up to `size` bytes (all that is left when None); b"" at the end of the body."""
        if self._done:
            return b""
        try:
            if self._chunked:
                return self._read_chunked(size)
            conn, left = self._conn, self._left
            if left is None:  # delimited by the close
                if size is None or size < 0:
                    chunks = []
                    while chunk := conn.read(65536):
                        chunks.append(chunk)
                    self._finish()
                    return b"".join(chunks)
                data = conn.read(size)
                if not data:
                    self._finish()
                return data
            want = left if size is None or size < 0 else min(size, left)
            data = conn.read(want)
            if len(data) < want:
                raise BadAnswer(f"the body ended {left - len(data)} bytes short")
            self._left = left - len(data)
            if not self._left:
                self._finish()
            return data
        except BaseException:
            self.close()
            raise

    def _read_chunked(self, size: int | None) -> bytes:
        conn, out = self._conn, []
        while size is None or size < 0 or not out:
            if not self._left:
                line = conn.readline()
                try:
                    n = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise BadAnswer("invalid chunk size") from None
                if n == 0:
                    while (t := conn.readline()) not in (b"\r\n", b"\n"):
                        if not t:
                            raise BadAnswer("the answer ended early")
                    self._finish()
                    break
                self._left = n
            want = self._left if size is None or size < 0 else min(size, self._left)
            data = conn.read(want)
            if len(data) < want:
                raise BadAnswer("the body ended early")
            self._left -= len(data)
            if not self._left:
                conn.read(2)  # the CRLF after the chunk
            out.append(data)
        return b"".join(out)

    def _finish(self) -> None:
        self._done = True
        if self._close:
            self._conn.close()
        else:
            self._client._release(self._conn)

    def close(self) -> None:
        if not self._done:
            # an unread body would be taken for the next answer: the connection cannot be reused
            self._done = True
            self._conn.close()


class WireClient:
    """SigV4-signed S3 requests over keep-alive HTTP/1.1 connections (sockets used directly:
    http.client's header parsing alone costs more than the signing).

    Idle connections wait in a LIFO deque: its append/pop are atomic, so a request takes no lock.
    Retries follow our botocore configuration (standard mode, max_attempts 3 = 4 tries in all)
    for the same errors: throttling, 5xx, broken connections. The jittered exponential back-off
    starts at 1 s for throttling and at 50 ms for the rest (botocore's newer standard-mode
    scales): a server's transient 500 costs a small pause, not up to a second per file. A pooled
    connection the server closed while idle is replaced at once without counting as an attempt."""

    ATTEMPTS = 4
    SMALL_BODY = 256 * 1024  # sent in one write together with the headers

    def __init__(self, *, secure: bool, netloc: str, bucket: str, path_style: bool, region: str,
                 access_key: str, secret_key: str, token: str, connect_timeout: float,
                 read_timeout: float, max_idle: int) -> None:
        default = 443 if secure else 80
        if netloc.endswith(f":{default}"):  # the Host header and the signature omit a default port
            netloc = netloc.rsplit(":", 1)[0]
        if path_style:
            self.host, self.base = netloc, "/" + quote(bucket, safe="")
        else:
            self.host, self.base = f"{bucket}.{netloc}", ""
        self._addr = split_host_port(self.host, default)
        self.secure = secure
        self.region = region
        self._ak, self._sk, self._token = access_key, secret_key, token
        self._timeouts = (connect_timeout, read_timeout)
        self._max_idle = max(1, max_idle)
        self._idle: deque[Connection] = deque()
        self._signing: tuple[str, bytes] = ("", b"")
        self._ssl: Any = None
        if secure:
            import ssl  # ~4 ms to import: only for https

            self._ssl = ssl.create_default_context(cafile=ca_bundle())

    # ---- connections -------------------------------------------------------------------------
    def _connect(self) -> Connection:
        connect_timeout, read_timeout = self._timeouts
        try:
            sock = socket.create_connection(self._addr, connect_timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection to {self.host} within {connect_timeout} s") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self._addr[0])
                sock.settimeout(read_timeout)
                return Connection(sock)
            sock.settimeout(None)  # blocking; the kernel keeps the time (see Connection)
            if read_timeout and read_timeout > 0:
                whole = int(read_timeout)
                tv = struct.pack("ll", whole, int((read_timeout - whole) * 1_000_000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            return Connection(sock, read_timeout)
        except BaseException:
            sock.close()
            raise

    def _release(self, conn: Connection) -> None:
        if len(self._idle) >= self._max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        while self._idle:
            with contextlib.suppress(IndexError):
                self._idle.pop().close()

    # ---- signing -----------------------------------------------------------------------------
    def _sign(self, method: str, path: str, query: str, headers: dict[str, str], payload: str) -> None:
        """Add x-amz-date, x-amz-content-sha256 and Authorization (SigV4) to `headers`, whose
        names are lower case; every header present is signed."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = payload
        if self._token:
            headers["x-amz-security-token"] = self._token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join((
            method, path, query, "".join(f"{n}:{headers[n]}\n" for n in names), signed, payload,
        ))
        day = stamp[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signing_day, key = self._signing
        if signing_day != day:
            key = ("AWS4" + self._sk).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._signing = (day, key)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self._ak}/{scope}, SignedHeaders={signed}, Signature={signature}"
        )

    # ---- requests ----------------------------------------------------------------------------
    def request(
        self,
        method: str,
        key: str | None,
        *,
        query: dict[str, str | None] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        stream: bool = False,
    ) -> tuple[Response, bytes]:
        """Send one request (key None: the bucket) and return (response, body). With `stream`
        the body is b"" and is read from the response, which the caller must read or close.
        Error answers raise ServerError, transport failures OSError (BadAnswer among them), after
        the retries."""
        path = self.base + "/" + quote(key, safe="/~") if key is not None else (self.base or "/")
        qs = target = ""
        if query:  # a None value: a bare flag ("?uploads"), signed as "uploads="
            pairs = sorted((quote(k, safe="-_.~"), None if v is None else quote(v, safe="-_.~"))
                           for k, v in query.items())
            qs = "&".join(f"{k}={v or ''}" for k, v in pairs)
            target = "?" + "&".join(k if v is None else f"{k}={v}" for k, v in pairs)
        target = path + target
        attempt = 0
        while True:
            hdrs = {"host": self.host}
            if headers:
                hdrs.update(headers)
            if self._sk or self._ak:
                self._sign(method, path, qs, hdrs, _EMPTY_SHA256 if not body else "UNSIGNED-PAYLOAD")
            lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in hdrs.items()), _USER_AGENT]
            if body or method in ("PUT", "POST"):
                lines.append(f"content-length: {len(body)}")
            lines.append("\r\n")
            head = "\r\n".join(lines).encode("latin-1")
            try:
                return self._exchange(method, head, body, stream)
            except ServerError as exc:
                retry = exc.code in RETRYABLE or exc.status >= 500
                if not retry or attempt + 1 >= self.ATTEMPTS:
                    raise
                scale = 1.0 if exc.code in _THROTTLING else 0.05
            except OSError as exc:
                if attempt + 1 >= self.ATTEMPTS or is_tls_error(exc):
                    raise
                scale = 0.05
            attempt += 1
            time.sleep(random.random() * min(20.0, scale * 2.0 ** (attempt - 1)))

    def _exchange(self, method: str, head: bytes, body: bytes, stream: bool) -> tuple[Response, bytes]:
        try:
            conn, reused = self._idle.pop(), True
        except IndexError:
            conn, reused = self._connect(), False
        while True:
            try:
                if len(body) <= self.SMALL_BODY:
                    conn.sock.sendall(head + body if body else head)
                else:
                    conn.sock.sendall(head)
                    conn.sock.sendall(memoryview(body))
                resp = Response(self, conn, method)
                break
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, Disconnected):
                conn.close()
                if not reused:
                    raise
                # the server closed this idle connection: try again at once on a new one
                conn, reused = self._connect(), False
            except BaseException:
                conn.close()
                raise
        if 200 <= resp.status < 300:
            return resp, b"" if stream else resp.read()
        raise error_from_answer(resp.status, resp.read())


    def put_streaming(self, key: str, headers: dict[str, str], length: int,
                      chunks: Iterable[bytes]) -> tuple[Response, bytes]:
        """PUT a body of `length` bytes taken from `chunks` as they come (a large object is never
        held in memory), on a new connection (a pooled one the server dropped would fail only
        once part of the body was spent). Not retried: the body cannot be read twice, the caller
        retries with a new reader. If `chunks` raises, the connection is closed before the body
        is complete, so the server stores nothing."""
        path = self.base + "/" + quote(key, safe="/~")
        hdrs = {"host": self.host, **headers}
        if self._sk or self._ak:
            self._sign("PUT", path, "", hdrs, "UNSIGNED-PAYLOAD")
        lines = [f"PUT {path} HTTP/1.1", *(f"{n}: {v}" for n, v in hdrs.items()), _USER_AGENT,
                 f"content-length: {length}", "\r\n"]
        conn = self._connect()
        try:
            try:
                conn.sock.sendall("\r\n".join(lines).encode("latin-1"))
                for chunk in chunks:
                    conn.sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # the server may have answered (an error) before taking the whole body: report that
                try:
                    resp = Response(self, conn, "PUT")
                except OSError:
                    raise exc from None
                if 200 <= resp.status < 300:
                    raise
                raise error_from_answer(resp.status, resp.read()) from exc
            resp = Response(self, conn, "PUT")
        except BaseException:
            conn.close()
            raise
        if 200 <= resp.status < 300:
            return resp, resp.read()
        raise error_from_answer(resp.status, resp.read())


def split_host_port(netloc: str, default: int) -> tuple[str, int]:
    if netloc.startswith("["):  # [IPv6]:port
        host, _, rest = netloc[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = netloc.rpartition(":")
    return (host, int(port)) if sep else (netloc, default)


def ca_bundle() -> str | None:
    """The CA file botocore would use: AWS_CA_BUNDLE, else certifi's, else its own."""
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if bundle:
        return bundle
    try:
        import certifi

        return str(certifi.where())
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("botocore")
        if spec and spec.origin:
            path = os.path.join(os.path.dirname(spec.origin), "cacert.pem")
            if os.path.exists(path):
                return path
    return None


def is_tls_error(exc: BaseException) -> bool:
    ssl = sys.modules.get("ssl")  # loaded if TLS was ever used
    return ssl is not None and isinstance(exc, ssl.SSLError)


# ---- S3's XML answers -------------------------------------------------------------------------
def xml_root(data: bytes) -> ET.Element | None:
    try:
        return ET.fromstring(data) if data else None
    except ET.ParseError:
        return None


def local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def child_texts(element: ET.Element) -> dict[str, str]:
    return {local_name(c.tag): c.text or "" for c in element}


def xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def answer_fields(resp: Response, data: bytes) -> dict[str, str]:
    """The child elements of a 200 answer's XML document (by name, whatever the root is called,
    as botocore reads them). S3 answers some calls (copy, complete) with 200 before the work is
    done and reports a failure in the body: that raises."""
    root = xml_root(data.strip())  # AWS may send whitespace to keep a slow answer alive
    if root is not None and local_name(root.tag) == "Error":
        raise error_from_answer(resp.status, data.strip())
    return child_texts(root) if root is not None else {}


def error_from_answer(status: int, data: bytes) -> ServerError:
    root = xml_root(data)
    if root is not None and local_name(root.tag) == "Error":
        fields = child_texts(root)
        return ServerError(status, fields.get("Code") or str(status), fields.get("Message", ""))
    # no S3 error document (HEAD has no body): the status and its phrase, as botocore reports them
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return ServerError(status, str(status), phrase)


# ---- small functions --------------------------------------------------------------------------
def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def whole_seconds(dt: Any) -> float:
    """LastModified in whole seconds: HEAD's header has second resolution and listings have
    milliseconds; flooring both keeps list() and head() consistent for the same object."""
    return float(math.floor(dt.timestamp()))


def iso_seconds(text: str) -> float:
    """A listing's LastModified (ISO 8601, "2023-11-14T22:13:20.000Z") in whole seconds."""
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return whole_seconds(dt)


def date_seconds(value: str | None, now: bool = False) -> float:
    """An HTTP date header (Last-Modified, Date) in whole seconds; with `now`, this machine's
    clock when there is none."""
    if value:
        with contextlib.suppress(KeyError, IndexError, ValueError):
            # the IMF-fixdate every server sends ("Sat, 21 Nov 2026 17:49:09 GMT"), parsed by hand:
            # email.utils costs ~10 ms to import and ~10 us per call
            _, day, month, year, clock, zone = value.split()
            if zone == "GMT":
                h, m, s = clock.split(":")
                return datetime(int(year), _MONTHS[month], int(day), int(h), int(m), int(s), tzinfo=UTC).timestamp()
        from email.utils import parsedate_to_datetime

        with contextlib.suppress(TypeError, ValueError):
            return whole_seconds(parsedate_to_datetime(value))
    if now:
        return float(math.floor(time.time()))
    raise ServerError(200, "InvalidResponse", "the answer has no valid date")
