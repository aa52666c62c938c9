"""S3 and the S3-compatible clouds (COS, OBS, BOS, KS3, Kodo, US3, AOSS, MinIO).

The clouds differ only in endpoint and signing-region rules, kept in the `FLAVOURS` table; one
class serves them all. The root is `bucket` + `prefix`; every key in and out is relative to it.

Two clients sit behind the one contract:
  lean    the data path: PUT, GET, HEAD, LIST, DELETE, CopyObject and multipart uploads
          (create, UploadPart, complete, abort, list), SigV4 signed here and sent over keep-alive
          HTTP/1.1 connections. botocore spends ~2 ms of CPU building and signing each request;
          this path ~0.2 ms, which is what decides small-file throughput on a few cores.
  boto3   everything else (UploadPartCopy and the metadata of copies above 5 GiB), every
          request where the lean path does not apply: no endpoint in the address (AWS's default
          endpoint), credentials that only boto3 can find (profiles, instance roles), a proxy
          from the environment, OSSIMPORT_S3_CLIENT=boto3; and a storage whose lean request was
          answered with a wrong-region redirect (botocore follows those). It is created on first
          use (import and set-up cost ~0.25 s of CPU).
Both go through the same error mapping (`_map_error`), so codes and messages do not depend on
which client sent a request.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import io
import math
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote_plus

from ossimport.errors import NotFound, SourceChanged, StorageError
from ossimport.storage.base import Abilities, Entry, Part, Storage, StorageOptions, StreamReader

if TYPE_CHECKING:
    from ossimport.address import Location

GiB = 1024**3
MiB = 1024**2


# ---- provider rules ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Flavour:
    """How one provider's endpoints look. `region` is matched against the endpoint host; its
    first group is the SigV4 signing region. `host_prefix` is put in front of a bare
    "<region>.<domain>" endpoint, the short form the ads-cli docs use for COS."""

    domain: str = ""
    region: str = ""
    host_prefix: str = ""


FLAVOURS: dict[str, Flavour] = {
    "s3": Flavour("amazonaws.com", r"^s3[.-]([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$"),
    "cos": Flavour("myqcloud.com", r"^cos\.([a-z0-9-]+)\.myqcloud\.com$", host_prefix="cos."),
    "obs": Flavour("myhuaweicloud.com", r"^obs\.([a-z0-9-]+)\.myhuaweicloud\.com$"),
    "bos": Flavour("bcebos.com", r"^(?:s3\.)?([a-z0-9]+)\.bcebos\.com$"),
    "ks3": Flavour("ksyuncs.com", r"^ks3-([a-z0-9-]+?)(?:-internal)?\.ksyuncs\.com$"),
    "qiniu": Flavour("qiniucs.com", r"^s3[.-]([a-z0-9-]+)\.qiniucs\.com$"),
    "ufile": Flavour("ufileos.com", r"^s3-([a-z0-9-]+)\.ufileos\.com$"),
    "aoss": Flavour("sensecoreapi-oss.cn", r"^aoss(?:-internal)?\.([a-z0-9-]+)\.sensecoreapi-oss\.cn$"),
    "minio": Flavour(),
}


def resolve_endpoint(location: Location) -> tuple[str, str | None]:
    """(endpoint host[:port] after provider fixes, signing region derived from it or None).

    The rules are matched by the endpoint's domain, not only by the address NAME, because users
    write s3:// for every S3-compatible cloud (the ads-cli docs do so for AOSS)."""
    endpoint = location.endpoint
    host = endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint
    flavour = next(
        (f for f in FLAVOURS.values() if f.domain and (host == f.domain or host.endswith("." + f.domain))),
        FLAVOURS.get(location.flavour, Flavour()),
    )
    if flavour.host_prefix and host.endswith("." + flavour.domain) and not host.startswith(flavour.host_prefix):
        if host.count(".") == flavour.domain.count(".") + 1:  # exactly "<region>.<domain>"
            endpoint, host = flavour.host_prefix + endpoint, flavour.host_prefix + host
    m = re.match(flavour.region, host) if flavour.region else None
    return endpoint, (m.group(1) if m else None)


# ---- errors -----------------------------------------------------------------------------------
_RETRYABLE = {
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeoutException",
    "500", "502", "503", "504", "429",
}
_HINTS = {
    "AccessDenied": "check the access and secret keys, the bucket's permissions and the endpoint",
    "SignatureDoesNotMatch": "check the secret key (escape '/' '@' ':' in it as %2F %40 %3A)",
    "InvalidAccessKeyId": "check the access key and that it belongs to this endpoint",
    "RequestTimeTooSkewed": "this machine's clock is off: synchronise it (e.g. with NTP)",
    "PermanentRedirect": "the bucket is in another region: use that region's endpoint",
    "AuthorizationHeaderMalformed": "the bucket is in another region: use that region's endpoint",
}
# Throttling asks for patience: the lean client backs off from 1 s for these, from 50 ms otherwise.
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable", "429", "503"}
# Status-only answers (HEAD has no body) carry the HTTP status as the code.
_STATUS_CODES = {"403": "AccessDenied", "301": "PermanentRedirect", "400": "BadRequest", "416": "InvalidRange"}




class _BadAnswer(ConnectionError):
    """The server's answer broke off or is not HTTP: a transport failure, retried like one."""


class _Disconnected(_BadAnswer):
    """The connection was closed before any answer (a pooled connection the server dropped)."""


class _ServerError(Exception):
    """An error answer on the lean path: what botocore's ClientError carries (status, S3 code,
    message). Status-only answers (HEAD) carry the status as the code, as botocore does."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status, self.code, self.message = status, code, message


class _Body(StreamReader):
    """The GET response body (either client's), with transport errors turned into StorageError
    like every call."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        self._body, self._storage, self._key = body, storage, key

    def _read_some(self, n: int) -> bytes:
        with self._storage._errors("read", self._key):
            return self._body.read(n)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):  # closing a broken connection is not an error
                self._body.close()
        super().close()


class _Conn:
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


class _Response:
    """An answer: status, headers (lower-case names) and the body, read with its framing
    (Content-Length, chunked, or up to the close). A body that ends early raises _BadAnswer,
    never returns short. Once the body is read whole the connection goes back to the pool."""

    __slots__ = ("status", "headers", "_lean", "_conn", "_left", "_chunked", "_close", "_done")

    def __init__(self, lean: _Lean, conn: _Conn, method: str) -> None:
        self._lean, self._conn = lean, conn
        while True:
            line = conn.readline()
            if not line:
                raise _Disconnected("the server closed the connection without an answer")
            version, _, rest = line.partition(b" ")
            try:
                status = int(rest[:3])
            except ValueError:
                raise _BadAnswer(f"not an HTTP status line: {line[:100]!r}") from None
            if not version.startswith(b"HTTP/"):
                raise _BadAnswer(f"not an HTTP status line: {line[:100]!r}")
            headers: dict[str, str] = {}
            for _ in range(200):
                h = conn.readline()
                if h in (b"\r\n", b"\n"):
                    break
                if not h:
                    raise _BadAnswer("the answer ended early")
                name, sep, value = h.partition(b":")
                if sep:
                    headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            else:
                raise _BadAnswer("too many headers")
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
                raise _BadAnswer("invalid Content-Length") from None
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
                raise _BadAnswer(f"the body ended {left - len(data)} bytes short")
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
                    raise _BadAnswer("invalid chunk size") from None
                if n == 0:
                    while (t := conn.readline()) not in (b"\r\n", b"\n"):
                        if not t:
                            raise _BadAnswer("the answer ended early")
                    self._finish()
                    break
                self._left = n
            want = self._left if size is None or size < 0 else min(size, self._left)
            data = conn.read(want)
            if len(data) < want:
                raise _BadAnswer("the body ended early")
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
            self._lean._release(self._conn)

    def close(self) -> None:
        if not self._done:
            # an unread body would be taken for the next answer: the connection cannot be reused
            self._done = True
            self._conn.close()


class _Lean:
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
        self._addr = _split_host_port(self.host, default)
        self.secure = secure
        self.region = region
        self._ak, self._sk, self._token = access_key, secret_key, token
        self._timeouts = (connect_timeout, read_timeout)
        self._max_idle = max(1, max_idle)
        self._idle: deque[_Conn] = deque()
        self._signing: tuple[str, bytes] = ("", b"")
        self._ssl: Any = None
        if secure:
            import ssl  # ~4 ms to import: only for https

            self._ssl = ssl.create_default_context(cafile=_ca_bundle())

    # ---- connections -------------------------------------------------------------------------
    def _connect(self) -> _Conn:
        connect_timeout, read_timeout = self._timeouts
        sock = socket.create_connection(self._addr, connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self._addr[0])
                sock.settimeout(read_timeout)
                return _Conn(sock)
            sock.settimeout(None)  # blocking; the kernel keeps the time (see _Conn)
            if read_timeout and read_timeout > 0:
                whole = int(read_timeout)
                tv = struct.pack("ll", whole, int((read_timeout - whole) * 1_000_000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            return _Conn(sock, read_timeout)
        except BaseException:
            sock.close()
            raise

    def _release(self, conn: _Conn) -> None:
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
    ) -> tuple[_Response, bytes]:
        """Send one request (key None: the bucket) and return (response, body). With `stream`
        the body is b"" and is read from the response, which the caller must read or close.
        Error answers raise _ServerError, transport failures OSError / HTTPException, after the
        retries."""
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
            except _ServerError as exc:
                retry = exc.code in _RETRYABLE or exc.status >= 500
                if not retry or attempt + 1 >= self.ATTEMPTS:
                    raise
                scale = 1.0 if exc.code in _THROTTLING else 0.05
            except OSError as exc:
                if attempt + 1 >= self.ATTEMPTS or _is_tls_error(exc):
                    raise
                scale = 0.05
            attempt += 1
            time.sleep(random.random() * min(20.0, scale * 2.0 ** (attempt - 1)))

    def _exchange(self, method: str, head: bytes, body: bytes, stream: bool) -> tuple[_Response, bytes]:
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
                resp = _Response(self, conn, method)
                break
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, _Disconnected):
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
        raise _error_from_answer(resp.status, resp.read())


def _split_host_port(netloc: str, default: int) -> tuple[str, int]:
    if netloc.startswith("["):  # [IPv6]:port
        host, _, rest = netloc[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = netloc.rpartition(":")
    return (host, int(port)) if sep else (netloc, default)


def _ca_bundle() -> str | None:
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


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                                       "Dec"), start=1)}
_USER_AGENT = "user-agent: ossimport"
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]*$")
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def _xml_root(data: bytes) -> ET.Element | None:
    try:
        return ET.fromstring(data) if data else None
    except ET.ParseError:
        return None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _child_texts(element: ET.Element) -> dict[str, str]:
    return {_local(c.tag): c.text or "" for c in element}


_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _answer_fields(resp: _Response, data: bytes) -> dict[str, str]:
    """The child elements of a 200 answer's XML document (by name, whatever the root is called,
    as botocore reads them). S3 answers some calls (copy, complete) with 200 before the work is
    done and reports a failure in the body: that raises."""
    root = _xml_root(data.strip())  # AWS may send whitespace to keep a slow answer alive
    if root is not None and _local(root.tag) == "Error":
        raise _error_from_answer(resp.status, data.strip())
    return _child_texts(root) if root is not None else {}


def _error_from_answer(status: int, data: bytes) -> _ServerError:
    root = _xml_root(data)
    if root is not None and _local(root.tag) == "Error":
        fields = _child_texts(root)
        return _ServerError(status, fields.get("Code") or str(status), fields.get("Message", ""))
    # no S3 error document (HEAD has no body): the status and its phrase, as botocore reports them
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return _ServerError(status, str(status), phrase)


def _lean_for(location: Location, options: StorageOptions, endpoint_url: str | None, region: str,
              path_style: bool) -> _Lean | None:
    """The lean client for this address, or None where boto3 must do the work."""
    if os.environ.get("OSSIMPORT_S3_CLIENT", "").lower() == "boto3" or not endpoint_url:
        return None
    if options.anonymous:
        ak = sk = token = ""
    elif location.access_key:
        ak, sk, token = location.access_key, location.secret_key, location.token
    elif os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # what botocore's first credential provider (the environment) would find
        ak, sk = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        token = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN") or ""
    else:
        return None  # profiles, SSO, instance roles: boto3's credential chain
    if not all(_HEADER_SAFE.match(v) for v in (ak, token)):
        return None  # not a value a header can carry as it is
    scheme, _, netloc = endpoint_url.partition("://")
    if any(name.lower().endswith("_proxy") for name in os.environ):
        import urllib.request  # ~10 ms to import: only when a proxy may be set

        host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
            return None  # botocore honours HTTP(S)_PROXY; these sockets do not
    if not path_style and not _DNS_BUCKET.match(location.bucket):
        path_style = True  # as botocore does for a bucket that cannot be a host name
    return _Lean(
        secure=scheme == "https", netloc=netloc, bucket=location.bucket, path_style=path_style,
        region=region, access_key=ak, secret_key=sk, token=token,
        connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
        max_idle=max(options.max_pool, 10),
    )


F = TypeVar("F", bound=Callable[..., Any])
# answers to a request signed for the wrong region, which botocore follows (S3RegionRedirector)
_REDIRECTS = {"PermanentRedirect", "AuthorizationHeaderMalformed", "TemporaryRedirect", "301", "307", "400"}


def _boto3_on_redirect(method: F) -> F:
    """Run `method`; if its lean request was answered with a wrong-region redirect, hand this
    storage to boto3 (which follows those) and run it again there."""

    @functools.wraps(method)
    def run(self: S3Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StorageError as exc:
            if not (isinstance(exc.__cause__, _ServerError) and self._handed_to_boto3(exc.__cause__)):
                raise
        return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class S3Storage(Storage):
    scheme = "s3"
    abilities = Abilities(
        multipart=True,
        server_side_copy=True,
        ranged_read=True,
        etag_is_md5=True,
        min_part_size=5 * MiB,
        max_part_size=5 * GiB,
        max_parts=10000,
    )
    # CopyObject takes sources up to 5 GiB; larger ones are copied part by part (UploadPartCopy).
    copy_limit: int = 5 * GiB
    copy_part_size: int = 512 * MiB

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        self.bucket = location.bucket
        self.root = location.prefix  # "" or ending in "/" (a single-object parent is split off first)
        endpoint, derived_region = resolve_endpoint(location)
        self.endpoint_url = replace(location, endpoint=endpoint).endpoint_url(self.options.https)
        self.region = (derived_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        self.addressing_style = "path" if location.path_style else ("virtual" if endpoint else "auto")
        self._boto: Any = None
        self._boto_lock = threading.Lock()
        self._lean = _lean_for(location, self.options, self.endpoint_url, self.region, location.path_style)
        if self._lean is None:
            self._client  # noqa: B018 - created now: a bad configuration fails at once
        self._closed = False

    def _handed_to_boto3(self, exc: _ServerError) -> bool:
        """True when `exc` is a wrong-region answer to a lean request: from now on boto3 serves
        this storage. (A bodiless 400 is what S3 answers a HEAD signed for the wrong region.)"""
        if self._lean is None or exc.code not in _REDIRECTS or (exc.code == "400" and exc.message != "Bad Request"):
            return False
        self._lean = None
        return True

    @property
    def _client(self) -> Any:
        """The boto3 client, created on first use and shared by every thread (it is thread-safe)."""
        client = self._boto
        if client is None:
            with self._boto_lock:
                if self._boto is None:
                    self._boto = self._make_client()
                client = self._boto
        return client

    def _make_client(self) -> Any:
        import boto3
        import botocore.handlers
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version=UNSIGNED if self.options.anonymous else "s3v4",
            s3={"addressing_style": self.addressing_style},
            max_pool_connections=max(self.options.max_pool, 10),
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
            retries={"mode": "standard", "max_attempts": 3},
            # Newer botocore adds CRC32 trailers/headers by default; Ceph and other older
            # S3-compatible servers reject them. ContentMD5 protects our uploads instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        location = self.location
        creds: dict[str, str] = {}
        if location.access_key and not self.options.anonymous:
            creds = {"aws_access_key_id": location.access_key, "aws_secret_access_key": location.secret_key}
            if location.token:
                creds["aws_session_token"] = location.token
        with self._errors("connect"):
            # A Session per Storage: the default session is not safe to create clients from
            # concurrently; without explicit keys it reads env / AWS_PROFILE / instance roles.
            client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config, **creds)
        # botocore sends `Expect: 100-continue` with every PUT body and waits for the answer: a
        # round trip per small object. Our single PUTs are small (large files go multipart), and a
        # refused request costs at most that small body.
        events = client.meta.events
        events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        events.register("before-call.s3", _expect_continue_except_put_object)
        return client

    # ---- required ----------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        full_prefix = self.root + prefix
        after = self.root + start_after if start_after and self.root + start_after > full_prefix else ""
        cut = len(self.root)
        pages = self._lean_pages(full_prefix, after) if self._lean else self._boto_pages(full_prefix, after)
        with self._errors("list", prefix):
            for page in pages:
                for key, size, mtime, etag in page:
                    if (key.endswith("/") and size == 0) or len(key) <= cut:
                        continue  # directory markers made by consoles and other tools
                    yield Entry(key[cut:], size, mtime, etag)

    def list_dirs(self, prefix: str = "") -> list[str]:
        # only when a job plans its scan ranges: boto3's paginator is plenty for a few requests
        full = self.root + prefix
        cut = len(self.root)
        with self._errors("list", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            dirs = [p["Prefix"][cut:] for page in pages for p in page.get("CommonPrefixes", ())]
        return sorted(dirs, key=lambda k: k.encode())

    def _boto_pages(self, prefix: str, after: str) -> Iterator[list[tuple[str, int, float, str | None]]]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after:
            args["StartAfter"] = after
        for page in self._client.get_paginator("list_objects_v2").paginate(**args):
            yield [(o["Key"], o["Size"], _seconds(o["LastModified"]), _etag(o.get("ETag")))
                   for o in page.get("Contents", ())]

    def _lean_pages(self, prefix: str, after: str) -> Iterator[list[tuple[str, int, float, str | None]]]:
        lean = self._lean
        assert lean is not None
        query: dict[str, str | None] = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if after:
            query["start-after"] = after
        seen: set[str] = set()
        try:
            _, data = lean.request("GET", None, query=query)
        except _ServerError as exc:
            if not self._handed_to_boto3(exc):
                raise
            yield from self._boto_pages(prefix, after)
            return
        while True:
            root = _xml_root(data)  # type: ignore[arg-type]
            if root is None or _local(root.tag) != "ListBucketResult":
                raise _ServerError(200, "InvalidResponse", "the listing is not a ListBucketResult")
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            decode = root.findtext(ns + "EncodingType") == "url"
            page = []
            for obj in root.iter(ns + "Contents"):
                key = obj.findtext(ns + "Key") or ""
                page.append((
                    unquote_plus(key) if decode else key,
                    int(obj.findtext(ns + "Size") or 0),
                    _iso_seconds(obj.findtext(ns + "LastModified") or ""),
                    _etag(obj.findtext(ns + "ETag")),
                ))
            yield page
            token = root.findtext(ns + "NextContinuationToken")
            if (root.findtext(ns + "IsTruncated") or "").lower() != "true" or not token:
                return
            if token in seen:  # botocore's paginator refuses a repeated token too
                raise _ServerError(200, "InvalidResponse", "the listing repeats a continuation token")
            seen.add(token)
            query["continuation-token"] = token
            _, data = lean.request("GET", None, query=query)

    @_boto3_on_redirect
    def head(self, key: str) -> Entry:
        with self._errors("head", key):
            if (lean := self._lean) is not None:
                resp, _ = lean.request("HEAD", self.root + key)
                return Entry(key, int(resp.headers.get("content-length") or 0),
                             _date_seconds(resp.headers.get("last-modified")), _etag(resp.headers.get("etag")))
            r = self._client.head_object(Bucket=self.bucket, Key=self.root + key)
        return Entry(key, r["ContentLength"], _seconds(r["LastModified"]), _etag(r.get("ETag")))

    @_boto3_on_redirect
    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if end is not None and end <= start:
            return io.BytesIO(b"")
        rng = f"bytes={start}-{'' if end is None else end - 1}" if start or end is not None else None
        try:
            with self._errors("get", key):
                if (lean := self._lean) is not None:
                    body, _ = lean.request(
                        "GET", self.root + key, headers={"range": rng} if rng else None, stream=True,
                    )
                    length = int(body.headers.get("content-length") or 0)
                else:
                    args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.root + key}
                    if rng:
                        args["Range"] = rng
                    r = self._client.get_object(**args)
                    body, length = r["Body"], r.get("ContentLength", 0)
        except StorageError as exc:
            # S3 refuses a range that starts at or past the end (416); like a file read past EOF,
            # that is simply no bytes.
            if exc.code != "InvalidRange" or start < self.head(key).size:
                raise
            return io.BytesIO(b"")
        if end is not None and length > end - start:
            # A server that ignores Range would hand back the whole object: never pass that off as
            # the requested bytes (a parallel download would write it at the wrong offset).
            with contextlib.suppress(Exception):
                body.close()
            raise StorageError(f"get {self._where(key)}: the server ignored the Range header", code="InvalidRange")
        return _Body(body, self, key)  # type: ignore[return-value]

    def put(
        self,
        key: str,
        data: BinaryIO,
        size: int,
        *,
        mtime: float | None = None,
        mode: int | None = None,
    ) -> Entry:
        body = _read_at_most(data, size + 1)  # one byte more reveals a source that grew
        if len(body) != size:
            raise SourceChanged(f"put {self._where(key)}: expected {size} bytes, the source gave "
                                f"{'more' if len(body) > size else len(body)}")
        return self._put_bytes(key, body, mtime)

    @_boto3_on_redirect
    def _put_bytes(self, key: str, body: bytes, mtime: float | None) -> Entry:
        size = len(body)
        with self._errors("put", key):
            if (lean := self._lean) is not None:
                headers = {"content-md5": _md5_b64(body)}
                if mtime is not None:
                    headers["x-amz-meta-mtime"] = repr(float(mtime))
                resp, _ = lean.request("PUT", self.root + key, headers=headers, body=body)
                return Entry(key, size, _date_seconds(resp.headers.get("date"), now=True),
                             _etag(resp.headers.get("etag")))
            r = self._client.put_object(
                Body=body, ContentLength=size, ContentMD5=_md5_b64(body), **self._write_args(key, mtime)
            )
        return Entry(key, size, _server_time(r), _etag(r.get("ETag")))

    @_boto3_on_redirect
    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            if (lean := self._lean) is not None:
                lean.request("DELETE", self.root + key)
            else:
                self._client.delete_object(Bucket=self.bucket, Key=self.root + key)

    # ---- multipart ---------------------------------------------------------------------------
    @_boto3_on_redirect
    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None) -> str:
        with self._errors("create multipart upload", key):
            if (lean := self._lean) is not None:
                headers = {"x-amz-meta-mtime": repr(float(mtime))} if mtime is not None else None
                resp, data = lean.request("POST", self.root + key, query={"uploads": None}, headers=headers)
                upload_id = _answer_fields(resp, data).get("UploadId")
                if not upload_id:
                    raise _ServerError(resp.status, "InvalidResponse", "the answer names no UploadId")
                return upload_id
            return str(self._client.create_multipart_upload(**self._write_args(key, mtime))["UploadId"])

    @_boto3_on_redirect
    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        with self._errors(f"upload part {number}", key):
            if (lean := self._lean) is not None:
                # No Content-MD5: an MD5 pass over the part is CPU that decides large-file speed,
                # and the engine already hashes every part it reads and compares the ETag this
                # returns (and the object's composite ETag) with it.
                resp, _ = lean.request(
                    "PUT", self.root + key, query={"partNumber": str(number), "uploadId": upload_id}, body=data,
                )
                etag = resp.headers.get("etag")
            else:
                etag = self._client.upload_part(
                    Bucket=self.bucket, Key=self.root + key, UploadId=upload_id, PartNumber=number,
                    Body=data, ContentLength=len(data), ContentMD5=_md5_b64(data),
                )["ETag"]
        return Part(number, _etag(etag) or "", len(data))

    @_boto3_on_redirect
    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        ordered = sorted(parts, key=lambda p: p.number)
        with self._errors("complete multipart upload", key):
            if (lean := self._lean) is not None:
                body = "".join(f"<Part><ETag>&quot;{_xml_text(p.etag)}&quot;</ETag><PartNumber>{p.number}</PartNumber>"
                               "</Part>" for p in ordered)
                document = f'<CompleteMultipartUpload xmlns="{_S3_NS}">{body}</CompleteMultipartUpload>'.encode()
                resp, data = lean.request("POST", self.root + key, query={"uploadId": upload_id},
                                                body=document)
                # S3 may fail the completion after answering 200: the error is in the body
                etag = _answer_fields(resp, data).get("ETag")
                mtime = _date_seconds(resp.headers.get("date"), now=True)
            else:
                r = self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.root + key, UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": f'"{p.etag}"'} for p in ordered]},
                )
                etag, mtime = r.get("ETag"), _server_time(r)
        if any(p.size <= 0 for p in ordered):  # parts rebuilt without sizes: ask the store
            return self.head(key)
        # Some servers (Ceph Pacific) answer an empty ETag here; None then, never a guess.
        return Entry(key, sum(p.size for p in ordered), mtime, _etag(etag))

    @_boto3_on_redirect
    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            with self._errors("abort multipart upload", key):
                if (lean := self._lean) is not None:
                    lean.request("DELETE", self.root + key, query={"uploadId": upload_id})
                else:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.root + key, UploadId=upload_id)
        except NotFound as exc:
            if exc.code != "NoSuchUpload":  # already gone: aborting is idempotent, like delete
                raise

    def list_multipart(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        cut = len(self.root)
        try:
            with self._errors("list multipart uploads", prefix):
                pages = (self._lean_upload_pages(self.root + prefix) if self._lean is not None
                         else self._boto_upload_pages(self.root + prefix))
                for page in pages:
                    for found, upload_id in page:
                        if found.startswith(self.root) and len(found) > cut:
                            yield found[cut:], upload_id
        except NotFound as exc:
            # `rclone serve s3` answers NoSuchUpload when there is no unfinished upload at all
            if exc.code != "NoSuchUpload":
                raise

    def _boto_upload_pages(self, prefix: str) -> Iterator[list[tuple[str, str]]]:
        for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            yield [(up["Key"], up["UploadId"]) for up in page.get("Uploads", ())]

    def _lean_upload_pages(self, prefix: str) -> Iterator[list[tuple[str, str]]]:
        lean = self._lean
        assert lean is not None
        query: dict[str, str | None] = {"uploads": None, "prefix": prefix}
        while True:
            try:
                resp, data = lean.request("GET", None, query=query)
            except _ServerError as exc:
                if "key-marker" in query or not self._handed_to_boto3(exc):
                    raise
                yield from self._boto_upload_pages(prefix)
                return
            root = _xml_root(data)
            if root is None or _local(root.tag) != "ListMultipartUploadsResult":
                raise _ServerError(resp.status, "InvalidResponse", "the answer is not a ListMultipartUploadsResult")
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            yield [(up.findtext(ns + "Key") or "", up.findtext(ns + "UploadId") or "")
                   for up in root.iter(ns + "Upload")]
            key_marker = root.findtext(ns + "NextKeyMarker")
            if (root.findtext(ns + "IsTruncated") or "").lower() != "true" or not key_marker:
                return
            if (key_marker, root.findtext(ns + "NextUploadIdMarker")) == (query.get("key-marker"),
                                                                            query.get("upload-id-marker")):
                raise _ServerError(resp.status, "InvalidResponse", "the listing repeats its markers")
            query["key-marker"] = key_marker
            query["upload-id-marker"] = root.findtext(ns + "NextUploadIdMarker") or ""

    # ---- server-side copy --------------------------------------------------------------------
    @_boto3_on_redirect
    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        src = src_root or self
        if not isinstance(src, S3Storage) or not self.same_server(src):
            raise StorageError(
                f"copy {src.describe()} to {self.describe()}: not on the same S3 server and account",
                code="NotImplemented",
            )
        source = {"Bucket": src.bucket, "Key": src.root + src_key}
        if size is None:
            size = src.head(src_key).size
        if size > self.copy_limit:
            info = src._head_raw(src_key)
            return self._copy_multipart(source, info, int(info["ContentLength"]), dst_key)
        with self._errors("copy", dst_key):
            if (lean := self._lean) is not None:
                copy_source = quote(f"{src.bucket}/{src.root}{src_key}", safe="/~")
                resp, data = lean.request("PUT", self.root + dst_key,
                                                headers={"x-amz-copy-source": copy_source})
                res = _answer_fields(resp, data)  # S3 may fail a copy after a 200
                mtime = (_iso_seconds(res["LastModified"]) if res.get("LastModified")
                         else _date_seconds(resp.headers.get("date"), now=True))
                return Entry(dst_key, size, mtime, _etag(res.get("ETag")))
            r = self._client.copy_object(Bucket=self.bucket, Key=self.root + dst_key, CopySource=source)
        res = r.get("CopyObjectResult", {})
        mtime = _seconds(res["LastModified"]) if "LastModified" in res else _server_time(r)
        return Entry(dst_key, size, mtime, _etag(res.get("ETag")))

    def _copy_multipart(self, source: dict[str, str], info: dict[str, Any], size: int, dst_key: str) -> Entry:
        part = max(self.copy_part_size, math.ceil(size / self.abilities.max_parts), self.abilities.min_part_size)
        with self._errors("create multipart upload", dst_key):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self.root + dst_key, Metadata=info.get("Metadata", {}),
                **({"ContentType": info["ContentType"]} if info.get("ContentType") else {}),
            )["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, part), start=1):
                last = min(offset + part, size) - 1
                with self._errors(f"copy part {number}", dst_key):
                    r = self._client.upload_part_copy(
                        Bucket=self.bucket, Key=self.root + dst_key, UploadId=upload_id, PartNumber=number,
                        CopySource=source, CopySourceRange=f"bytes={offset}-{last}",
                    )
                parts.append(Part(number, _etag(r["CopyPartResult"]["ETag"]) or "", last - offset + 1))
            return self.complete_multipart(dst_key, upload_id, parts)
        except BaseException:
            with contextlib.suppress(StorageError):
                self.abort_multipart(dst_key, upload_id)
            raise

    def same_server(self, other: Storage) -> bool:
        return (
            isinstance(other, S3Storage)
            and other.endpoint_url == self.endpoint_url
            and other.location.access_key == self.location.access_key
            and other.options.anonymous == self.options.anonymous
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if (lean := self._lean) is not None:
                lean.close()
            if self._boto is not None:
                with contextlib.suppress(Exception):
                    self._boto.close()

    # ---- helpers -----------------------------------------------------------------------------
    def _head_raw(self, key: str) -> dict[str, Any]:
        with self._errors("head", key):
            return dict(self._client.head_object(Bucket=self.bucket, Key=self.root + key))

    def _write_args(self, key: str, mtime: float | None) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.root + key}
        if mtime is not None:
            # Informative, as rclone stores it: S3 keeps its own LastModified, which is Entry.mtime.
            args["Metadata"] = {"mtime": repr(float(mtime))}
        return args

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.root}{key} at {self.endpoint_url or 'the AWS default endpoint'}"

    @contextlib.contextmanager
    def _errors(self, op: str, key: str = "") -> Iterator[None]:
        """Turn every failure of either client inside the block into a StorageError."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            mapped = self._map_error(exc, op, key)
            if mapped is None:
                raise
            raise mapped from exc

    def _map_error(self, exc: BaseException, op: str, key: str) -> StorageError | None:
        """The one place where S3 failures become StorageError codes, whichever client failed.
        Never includes a secret. None: not a storage failure (a bug), left to propagate."""
        where = self._where(key)
        endpoint = self.endpoint_url or "the AWS default endpoint"
        botocore_exc: Any = sys.modules.get("botocore.exceptions")  # loaded if boto3 was used
        err: StorageError
        answer: tuple[str, int | None, str] | None = None
        if isinstance(exc, _ServerError):
            answer = (exc.code, exc.status, exc.message)
        elif botocore_exc is not None and isinstance(exc, botocore_exc.ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            answer = (str(error.get("Code") or status or "Unknown"), status, error.get("Message") or "")
        if answer is not None:
            code, status, detail = answer
            code = "NoSuchKey" if code == "404" else _STATUS_CODES.get(code, code)
            if code == "NoSuchBucket":
                err = NotFound(
                    f"{op} {where}: bucket {self.bucket!r} does not exist at {endpoint}; "
                    "create it or fix the bucket name in the address", code="NoSuchBucket",
                )
            elif code in ("NoSuchKey", "NoSuchUpload", "NotFound"):
                err = NotFound(f"{op} {where}: {code}{': ' + detail if detail else ''}", code=code)
            else:
                hint = _HINTS.get(code)
                text = f"{op} {where}: {code}{': ' + detail if detail else ''}{'; ' + hint if hint else ''}"
                retry = code in _RETRYABLE or (isinstance(status, int) and status >= 500)
                err = StorageError(text, code=code, retryable=retry)
        elif botocore_exc is not None and isinstance(
            exc, (botocore_exc.NoCredentialsError, botocore_exc.PartialCredentialsError)
        ):
            err = StorageError(
                f"{op} {where}: no usable credentials; put AK:SK in the address, set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or use --anonymous for a public bucket",
                code="NoCredentials",
            )
        elif _is_tls_error(exc) or (botocore_exc is not None and isinstance(exc, botocore_exc.SSLError)):
            err = StorageError(f"{op} {where}: TLS failed with {endpoint}: {exc}", code="SSLError")
        elif isinstance(exc, OSError) or _is_transport_error(exc, botocore_exc):
            err = StorageError(
                f"{op} {where}: cannot reach {endpoint} ({type(exc).__name__}); check the endpoint, "
                "the network and --https", code="ConnectionError", retryable=True,
            )
        elif botocore_exc is not None and isinstance(exc, botocore_exc.BotoCoreError):
            err = StorageError(f"{op} {where}: {type(exc).__name__}: {exc}", code=type(exc).__name__)
        else:
            return None
        return self._scrub(err)

    def _scrub(self, err: StorageError) -> StorageError:
        """Last line of defence: no secret may reach a message, even if a server echoes it."""
        text = str(err)
        for secret in (self.location.secret_key, self.location.token):
            if secret and len(secret) >= 4 and secret in text:
                text = text.replace(secret, "***")
                err.args = (text,)
        return err


# ---- small functions --------------------------------------------------------------------------
def _is_tls_error(exc: BaseException) -> bool:
    ssl = sys.modules.get("ssl")  # loaded if TLS was ever used
    return ssl is not None and isinstance(exc, ssl.SSLError)


def _is_transport_error(exc: BaseException, botocore_exc: Any) -> bool:
    if botocore_exc is not None and isinstance(exc, (
        botocore_exc.ConnectionError, botocore_exc.HTTPClientError, botocore_exc.IncompleteReadError,
    )):
        return True
    urllib3_exc: Any = sys.modules.get("urllib3.exceptions")
    return urllib3_exc is not None and isinstance(exc, urllib3_exc.HTTPError)


def _etag(value: str | None) -> str | None:
    value = (value or "").strip('"').lower()
    return value or None


def _seconds(dt: Any) -> float:
    """LastModified in whole seconds: HEAD's header has second resolution and listings have
    milliseconds; flooring both keeps list() and head() consistent for the same object."""
    return float(math.floor(dt.timestamp()))


def _iso_seconds(text: str) -> float:
    """A listing's LastModified (ISO 8601, "2023-11-14T22:13:20.000Z") in whole seconds."""
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return _seconds(dt)


def _date_seconds(value: str | None, now: bool = False) -> float:
    """An HTTP date header (Last-Modified, Date) in whole seconds; with `now`, this machine's
    clock when there is none (as `_server_time`)."""
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
            return _seconds(parsedate_to_datetime(value))
    if now:
        return float(math.floor(time.time()))
    raise _ServerError(200, "InvalidResponse", "the answer has no valid date")


def _server_time(response: dict[str, Any]) -> float:
    """The server's Date header: what LastModified will say, without another request."""
    return _date_seconds(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date"), now=True)


def _expect_continue_except_put_object(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
    import botocore.handlers

    if model.name != "PutObject":
        botocore.handlers.add_expect_header(model, params, **kwargs)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _read_at_most(stream: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes, looping because raw streams and sockets return short reads."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
