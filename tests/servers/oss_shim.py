"""An OSS wire-protocol test double: a small HTTP server that speaks OSS to its clients and S3 to moto.

No real OSS server runs offline, and oss2 cannot talk to moto directly beyond put/get/head/delete
(see /work/shared/REFERENCE.md section 5). This shim sits in front of its own moto server and
translates each request and response so that oss2's real client code (signing, XML parsing, CRC64
checks, exception classes) runs end to end.

moto runs as a child process (`python -m moto.server`), not as an in-process ThreadedMotoServer:
moto's minimum part size is a module constant read from S3_UPLOAD_PART_MIN_SIZE at import, and
OSS's minimum (100 KiB) differs from S3's (5 MiB); an in-process moto would also share its global
state (and any /moto-api/reset) with every other moto user in the test process.

Translation:

- authentication: verifies the OSS v1 signature (`Authorization: OSS AK:SIG`), the STS token and the
  request date, and answers InvalidAccessKeyId / SignatureDoesNotMatch / AccessDenied /
  RequestTimeTooSkewed like OSS; moto itself is called with a fixed dummy credential;
- headers: x-oss-* <-> x-amz-* (meta, copy-source, copy-source-range, acl, ...), ETags upper-case
  outward like OSS and lower-case inward for moto; x-oss-request-id on every answer;
- query: empty continuation-token= (and other empty markers) dropped, OSS-only parameters dropped,
  encoding-type=url done here (moto does not encode);
- XML: the S3 namespace is stripped, listing entries get <Type>, OSS-required elements are added,
  errors become OSS error documents (HEAD errors travel base64-encoded in x-oss-err);
- x-oss-hash-crc64ecma on PutObject, UploadPart, CompleteMultipartUpload, CopyObject, GET and
  HEAD, computed with oss2.utils.Crc64 over the real bytes (fetched from moto when needed and
  cached by ETag + size, which determine the content);
- ranges: without `x-oss-range-behavior: standard` an unsatisfiable range returns the whole object
  with 200, as OSS does; with it, 416 InvalidRange.

Request bodies are spooled (memory, then disk) and only forwarded once complete, so a client that
sends fewer bytes than its Content-Length never creates an object — as on the real service.
Response bodies are streamed.

For tests of failure handling: `inject_errors(status, code, n)` answers the next n requests with
that OSS error, and `crc_offset` makes every CRC64 answer wrong; `clear_faults()` resets both.

    shim = OSSShim()            # default credentials OSSAKID1234 / OSSSECRET5678
    port = shim.start()
    shim.create_bucket("data")
    ...
    shim.stop()
"""

from __future__ import annotations

import atexit
import base64
import email.utils
import hashlib
import hmac
import http.client
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit
from xml.etree import ElementTree as ET

from oss2.auth import ProviderAuth
from oss2.utils import Crc64

DEFAULT_CREDENTIALS = {"OSSAKID1234": "OSSSECRET5678"}

# moto answers anonymous GETs of private objects with 403, so every forwarded request carries an
# (unverified) credential; moto maps unknown keys to its default account.
_MOTO_AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKIDOSSSHIM/20240101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host, Signature=0000"
)
_CHUNK = 64 * 1024
_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_MAX_SKEW = 15 * 60  # seconds, as OSS
_CRC_CACHE_SIZE = 4096
OSS_MIN_PART_SIZE = 100 * 1024  # every part but the last; S3 (and moto by default) want 5 MiB
_MOTO_START_TIMEOUT = 30.0

# OSS signs these query parameters (the "subresources"); the list is the service's, kept in oss2.
_SUBRESOURCES: frozenset[str] = frozenset(ProviderAuth._subresource_key_set)
# Value parameters that S3/moto rejects or misreads when present but empty.
_DROP_IF_EMPTY = frozenset(
    {"continuation-token", "start-after", "delimiter", "prefix", "marker", "key-marker",
     "upload-id-marker", "part-number-marker", "version-id-marker"}
)
# Parameters not forwarded: OSS-only ones with no S3 meaning (objectMeta turns GetObjectMeta into a
# plain HEAD), signed-URL fields, and encoding-type, which the shim applies itself (moto does not).
_OSS_ONLY_PARAMS = frozenset(
    {"objectMeta", "x-oss-traffic-limit", "sequential", "security-token", "encoding-type",
     "OSSAccessKeyId", "Expires", "Signature"}
)
# Subresources the shim cannot emulate on moto: refused rather than answered wrongly.
_UNSUPPORTED_SUBRESOURCES = frozenset({"bucketInfo", "stat", "append", "symlink", "x-oss-process", "qos"})
_HOP_BY_HOP = frozenset(
    {"host", "authorization", "connection", "keep-alive", "transfer-encoding", "content-length",
     "expect", "date", "accept-encoding", "te", "upgrade", "proxy-connection"}
)
# Request headers that only matter to the shim (auth, range semantics).
_SHIM_ONLY_HEADERS = frozenset({"x-oss-security-token", "x-oss-date", "x-oss-range-behavior", "x-oss-content-sha256"})
_ETAG_HEADERS = frozenset({"if-match", "if-none-match", "x-oss-copy-source-if-match", "x-oss-copy-source-if-none-match"})
# S3 error codes whose OSS names differ.
_ERROR_CODES = {"BucketAlreadyOwnedByYou": "BucketAlreadyExists", "BadDigest": "InvalidDigest"}
# Listing elements OSS url-encodes under encoding-type=url.
_ENCODED_TAGS = frozenset(
    {"Key", "Prefix", "StartAfter", "Delimiter", "Marker", "NextMarker", "ContinuationToken",
     "NextContinuationToken", "KeyMarker", "NextKeyMarker"}
)
_S3_NS = re.compile(r"^\{[^}]*\}")


class ShimError(Exception):
    """An OSS error answer decided by the shim itself."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(slots=True)
class _Body:
    file: IO[bytes]
    size: int
    crc: int
    md5: bytes


def _upper_etag(etag: str) -> str:
    return etag.upper()


def _lower_etag(etag: str) -> str:
    return etag.lower()


def _strip_namespaces(root: ET.Element) -> None:
    for el in root.iter():
        el.tag = _S3_NS.sub("", el.tag)


def _object_type(etag: str) -> str:
    return "Multipart" if "-" in etag else "Normal"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, shim: OSSShim) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.shim = shim
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-request is normal here (size-mismatch tests do it)

    def close_client_sockets(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so they exit."""
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class OSSShim:
    """The OSS front end plus its private moto server. `start()` returns the OSS port."""

    def __init__(
        self,
        credentials: dict[str, str] | None = None,
        *,
        sts_tokens: dict[str, str] | None = None,
        public_buckets: Iterable[str] = (),
    ) -> None:
        # access key id -> secret; keys listed in sts_tokens must also send that security token
        self.credentials = dict(credentials if credentials is not None else DEFAULT_CREDENTIALS)
        self.sts_tokens = dict(sts_tokens or {})
        self.public_buckets = set(public_buckets)  # anonymous GET/HEAD allowed
        self.port = 0
        self.moto_port = 0
        self.requests_served = 0
        # fault injection for tests: a server whose CRC64 answers are off by this much, and
        # errors answered instead of the next requests (see inject_errors)
        self.crc_offset = 0
        self._faults: list[tuple[int, str]] = []
        self._moto: subprocess.Popen[bytes] | None = None
        self._moto_log: IO[bytes] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._crc_cache: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._lock = threading.Lock()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> int:
        self._start_moto()
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="oss-shim",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # no orphaned moto if a test run dies before stop()
        return self.port

    def _start_moto(self) -> None:
        env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(OSS_MIN_PART_SIZE)}
        for _ in range(3):  # a free port can be taken between probing and binding: try again
            self.moto_port = _free_port()
            self._moto_log = tempfile.TemporaryFile()  # closed in stop()
            self._moto = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                stdin=subprocess.DEVNULL, stdout=self._moto_log, stderr=subprocess.STDOUT, env=env,
            )
            deadline = time.monotonic() + _MOTO_START_TIMEOUT
            while time.monotonic() < deadline and self._moto.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.moto_port), timeout=1):
                        return
                except OSError:
                    time.sleep(0.05)
            self._stop_moto()
        self._moto_log.seek(0)
        tail = self._moto_log.read()[-2000:].decode(errors="replace")
        self._moto_log.close()
        raise RuntimeError(f"moto server did not start on 127.0.0.1:{self.moto_port}:\n{tail}")

    def stop(self) -> None:
        """Stop the front end and moto. Safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.close_client_sockets()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._stop_moto()
        if self._moto_log is not None:
            self._moto_log.close()
            self._moto_log = None

    def _stop_moto(self) -> None:
        if self._moto is None:
            return
        self._moto.terminate()
        try:
            self._moto.wait(10)
        except subprocess.TimeoutExpired:
            self._moto.kill()
            self._moto.wait(10)
        self._moto = None

    def inject_errors(self, status: int, code: str, count: int = 1) -> None:
        """Answer the next `count` authenticated requests with this OSS error instead of serving them."""
        with self._lock:
            self._faults.extend([(status, code)] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
        self.crc_offset = 0

    def next_fault(self) -> tuple[int, str] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def crc_header(self, crc: int) -> str:
        return str((crc + self.crc_offset) % 2**64)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def moto_endpoint(self) -> str:
        """http://127.0.0.1:PORT of the moto server behind the shim (S3 protocol, no auth)."""
        return f"http://127.0.0.1:{self.moto_port}"

    def create_bucket(self, name: str) -> None:
        """Create a bucket directly on moto."""
        resp = self.moto_request("PUT", "/" + quote(name, safe=""))
        body = resp.read()
        resp.close()
        if resp.status not in (200, 409):
            raise RuntimeError(f"moto refused bucket {name!r}: {resp.status} {body[:200]!r}")

    # ---- moto access -------------------------------------------------------------------------
    def moto_request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: IO[bytes] | bytes | None = None
    ) -> http.client.HTTPResponse:
        """One request to moto on a fresh connection (werkzeug closes each one anyway).
        The caller reads and closes the response."""
        conn = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=120)
        hdrs = {"Authorization": _MOTO_AUTH, **(headers or {})}
        if body is None and method in ("PUT", "POST"):
            hdrs["Content-Length"] = "0"
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        # the response holds its own reference to the socket, which closes once it is read
        conn.close()
        return resp

    def object_crc(self, target: str, etag: str, size: int | None) -> int | None:
        """CRC64 of the object at `target` (a moto path) whose ETag is `etag` (moto's form)."""
        if size is not None:
            with self._lock:
                cached = self._crc_cache.get((etag, size))
                if cached is not None:
                    self._crc_cache.move_to_end((etag, size))
                    return cached
        resp = self.moto_request("GET", target, {"If-Match": etag})
        try:
            if resp.status != 200:
                resp.read()
                return None
            crc = Crc64()
            n = 0
            while chunk := resp.read(_CHUNK):
                crc.update(chunk)
                n += len(chunk)
        finally:
            resp.close()
        self.remember_crc(etag, n, crc.crc)
        return crc.crc

    def remember_crc(self, etag: str, size: int, crc: int) -> None:
        with self._lock:
            self._crc_cache[(etag, size)] = crc
            while len(self._crc_cache) > _CRC_CACHE_SIZE:
                self._crc_cache.popitem(last=False)

    # ---- authentication ------------------------------------------------------------------------
    def authenticate(self, method: str, bucket: str, key: str, params: list[tuple[str, str]],
                     headers: Any) -> None:
        """Raise ShimError unless the request is signed with known credentials (OSS v1)."""
        auth = headers.get("Authorization")
        if not auth:
            if bucket in self.public_buckets and method in ("GET", "HEAD"):
                return
            raise ShimError(403, "AccessDenied", "You have no right to access this object because of bucket acl.")
        m = re.fullmatch(r"OSS ([^:\s]+):(\S+)", auth.strip())
        if not m:
            raise ShimError(400, "InvalidArgument", "Authorization header is invalid.")
        access_key, signature = m.group(1), m.group(2)
        secret = self.credentials.get(access_key)
        if secret is None:
            raise ShimError(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.")
        token = self.sts_tokens.get(access_key)
        if token is not None and headers.get("x-oss-security-token") != token:
            raise ShimError(403, "InvalidAccessKeyId", "The security token you provided is invalid.")
        date = headers.get("x-oss-date") or headers.get("Date") or ""
        try:
            when = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            raise ShimError(403, "AccessDenied", "OSS authentication requires a valid Date.") from None
        if abs(when - time.time()) > _MAX_SKEW:
            raise ShimError(403, "RequestTimeTooSkewed",
                            "The difference between the request time and the current time is too large.")
        canon_headers = sorted(
            (name.lower(), value) for name, value in headers.items() if name.lower().startswith("x-oss-")
        )
        sub = sorted((k, v) for k, v in params if k in _SUBRESOURCES)
        resource = f"/{bucket}/{key}" if bucket else "/"
        if sub:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
        string_to_sign = "\n".join(
            [method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), date,
             "".join(f"{k}:{v}\n" for k, v in canon_headers) + resource]
        )
        expected = base64.b64encode(
            hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha1).digest()
        )
        if not hmac.compare_digest(expected, signature.encode(errors="replace")):
            raise ShimError(403, "SignatureDoesNotMatch",
                            "The request signature we calculated does not match the signature you provided.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as oss2's pooled session expects
    timeout = 60  # an idle keep-alive connection is dropped after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests' output is what matters

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ---- entry -------------------------------------------------------------------------------
    def _handle(self) -> None:
        shim = self.server.shim
        self._request_id = uuid.uuid4().hex.upper()[:24]
        self._headers_sent = False
        with shim._lock:
            shim.requests_served += 1
        body: _Body | None = None
        try:
            body = self._read_body()
            if body is None:  # the client went away mid-body: nothing is forwarded
                self.close_connection = True
                return
            split = urlsplit(self.path)
            path = split.path
            params = _parse_query(split.query)
            bucket, _, raw_key = path.lstrip("/").partition("/")
            bucket = unquote(bucket)
            key = unquote(raw_key)
            shim.authenticate(self.command, bucket, key, params, self.headers)
            fault = shim.next_fault()
            if fault is not None:
                raise ShimError(fault[0], fault[1], "injected by the test")
            self._dispatch(bucket, key, path, params, body)
        except ShimError as e:
            self._send_error(e.status, e.code, e.message)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug in the shim: answer like a server error, keep serving
            if self._headers_sent:
                self.close_connection = True
            else:
                self._send_error(500, "InternalError", f"oss shim: {type(e).__name__}: {e}")
        finally:
            if body is not None:
                body.file.close()

    def _read_body(self) -> _Body | None:
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
        crc, md5, size = Crc64(), hashlib.md5(), 0

        def take(chunk: bytes) -> None:
            nonlocal size
            spool.write(chunk)
            crc.update(chunk)
            md5.update(chunk)
            size += len(chunk)

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    spool.close()
                    return None
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                remaining = n
                while remaining:
                    chunk = self.rfile.read(min(_CHUNK, remaining))
                    if not chunk:
                        spool.close()
                        return None
                    take(chunk)
                    remaining -= len(chunk)
                self.rfile.readline(16)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    spool.close()
                    return None
                take(chunk)
                remaining -= len(chunk)
        spool.seek(0)
        return _Body(spool, size, crc.crc, md5.digest())

    # ---- routing -----------------------------------------------------------------------------
    def _dispatch(self, bucket: str, key: str, path: str, params: list[tuple[str, str]], body: _Body) -> None:
        names = {k for k, _ in params}
        method = self.command
        if names & _UNSUPPORTED_SUBRESOURCES:
            raise ShimError(400, "NotImplemented", "The OSS shim does not emulate " + ", ".join(sorted(names & _UNSUPPORTED_SUBRESOURCES)))
        if self.headers.get("x-oss-forbid-overwrite", "").lower() == "true":
            raise ShimError(400, "NotImplemented", "The OSS shim does not emulate x-oss-forbid-overwrite")
        headers = self._s3_headers()
        target = path + _build_query(params)
        copy_source = self.headers.get("x-oss-copy-source")

        if not bucket:
            return self._relay(method, target, headers, body, xml=True)
        if not key:  # bucket operations
            if method == "PUT" and not names:  # CreateBucket: OSS's XML body means nothing to S3
                return self._relay(method, target, headers, None)
            if method == "GET" and "uploads" in names:
                return self._relay(method, target, headers, None, xml=True, listing=True)
            if method == "GET" and not (names - {"list-type", "prefix", "delimiter", "continuation-token",
                                                 "start-after", "fetch-owner", "max-keys", "marker",
                                                 "encoding-type"}):
                return self._relay(method, target, headers, None, xml=True, listing=True)
            return self._relay(method, target, headers, body, xml=True, listing="delete" in names)
        if method == "PUT" and copy_source:
            return self._copy(target, headers, "partNumber" in names)
        if method == "PUT" and not (names - {"partNumber", "uploadId"}):
            return self._put(target, headers, body)
        if method == "POST" and "uploadId" in names:
            return self._complete(target, headers, body)
        if method in ("GET", "HEAD") and not (names - {"versionId", "response-content-type",
                                                      "response-content-disposition", "response-cache-control",
                                                      "response-content-encoding", "response-expires",
                                                      "response-content-language", "objectMeta"}):
            return self._get(method, target, headers)
        return self._relay(method, target, headers, body, xml=True)

    # ---- operations --------------------------------------------------------------------------
    def _put(self, target: str, headers: dict[str, str], body: _Body) -> None:
        """PutObject and UploadPart: the CRC64 and MD5 of what we received go back to the client."""
        headers["Content-Length"] = str(body.size)
        resp = self.server.shim.moto_request("PUT", target, headers, body.file)
        data = resp.read()
        resp.close()
        if resp.status >= 300:
            return self._relay_error(resp, data, "PUT", target)
        etag = resp.getheader("ETag", "")
        if "uploadId" not in target:
            self.server.shim.remember_crc(etag, body.size, body.crc)
        out = self._oss_headers(resp)
        out["x-oss-hash-crc64ecma"] = self.server.shim.crc_header(body.crc)
        out["Content-MD5"] = base64.b64encode(body.md5).decode()
        self._send(resp.status, out, b"")

    def _copy(self, target: str, headers: dict[str, str], is_part: bool) -> None:
        """CopyObject / UploadPartCopy: S3 gives the ETag only in the XML; OSS also in a header."""
        shim = self.server.shim
        resp = shim.moto_request("PUT", target, headers)
        data = resp.read()
        resp.close()
        if resp.status >= 300:
            return self._relay_error(resp, data, "PUT", target)
        root = _parse_xml(data)
        etag = root.findtext("ETag") or resp.getheader("ETag", "")
        out = self._oss_headers(resp)
        out["ETag"] = _upper_etag(etag)
        if not is_part:
            crc = shim.object_crc(target.split("?", 1)[0], _lower_etag(etag), None)
            if crc is not None:
                out["x-oss-hash-crc64ecma"] = shim.crc_header(crc)
        self._send(resp.status, out, _xml_bytes(root), content_type="application/xml")

    def _complete(self, target: str, headers: dict[str, str], body: _Body) -> None:
        """CompleteMultipartUpload: ETags back to moto's case; ETag and CRC64 headers on the answer."""
        shim = self.server.shim
        payload = body.file.read()
        if payload.strip():
            req = _parse_xml(payload)
            for el in req.iter("ETag"):
                el.text = _lower_etag(el.text or "")
            payload = _xml_bytes(req)
        headers["Content-Length"] = str(len(payload))
        resp = shim.moto_request("POST", target, headers, payload)
        data = resp.read()
        resp.close()
        if resp.status >= 300:
            return self._relay_error(resp, data, "POST", target)
        root = _parse_xml(data)
        if root.tag == "Error":  # S3 may report a failed completion inside a 200
            code = root.findtext("Code") or ""
            return self._send_moto_error(500 if code == "InternalError" else 400, root)
        etag = root.findtext("ETag") or ""
        out = self._oss_headers(resp)
        out["ETag"] = _upper_etag(etag)
        crc = shim.object_crc(target.split("?", 1)[0], _lower_etag(etag), None)
        if crc is not None:
            out["x-oss-hash-crc64ecma"] = shim.crc_header(crc)
        _upper_etags_in(root)
        self._send(resp.status, out, _xml_bytes(root), content_type="application/xml")

    def _get(self, method: str, target: str, headers: dict[str, str]) -> None:
        """GetObject / HeadObject: streamed, with x-oss-object-type and the whole object's CRC64."""
        shim = self.server.shim
        standard_range = self.headers.get("x-oss-range-behavior", "").lower() == "standard"
        resp = shim.moto_request(method, target, headers)
        if resp.status == 416 and not standard_range:
            # OSS ignores an unsatisfiable range and returns the whole object
            resp.read()
            resp.close()
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            resp = shim.moto_request(method, target, headers)
        try:
            if resp.status >= 300:
                data = resp.read()
                return self._relay_error(resp, data, method, target)
            etag = resp.getheader("ETag", "")
            content_range = resp.getheader("Content-Range")
            total: int | None
            if content_range and "/" in content_range:
                total = int(content_range.rsplit("/", 1)[1])
            else:
                total = int(resp.getheader("Content-Length", "0"))
            out = self._oss_headers(resp)
            out["x-oss-object-type"] = _object_type(etag)
            out["Accept-Ranges"] = "bytes"
            crc = shim.object_crc(target.split("?", 1)[0], etag, total)
            if crc is not None:
                out["x-oss-hash-crc64ecma"] = shim.crc_header(crc)
            length = int(resp.getheader("Content-Length", "0"))
            self._send_headers(resp.status, out, length)
            if method == "HEAD":
                return
            remaining = length
            while remaining:
                chunk = resp.read(min(_CHUNK, remaining))
                if not chunk:
                    self.close_connection = True  # moto cut the body short: so do we
                    return
                self.wfile.write(chunk)
                remaining -= len(chunk)
        finally:
            resp.close()

    def _relay(self, method: str, target: str, headers: dict[str, str], body: _Body | None,
               *, xml: bool = False, listing: bool = False) -> None:
        """Any other request: forwarded, XML answers translated."""
        if body is not None and body.size:
            headers["Content-Length"] = str(body.size)
        resp = self.server.shim.moto_request(method, target, headers, body.file if body and body.size else None)
        data = resp.read()
        resp.close()
        if resp.status >= 300:
            return self._relay_error(resp, data, method, target)
        out = self._oss_headers(resp)
        if xml and data.lstrip().startswith(b"<"):
            root = _parse_xml(data)
            if listing:
                _fix_listing(root, encode=self._wants_url_encoding())
            _upper_etags_in(root)
            return self._send(resp.status, out, _xml_bytes(root), content_type="application/xml")
        self._send(resp.status, out, data, content_type=resp.getheader("Content-Type"))

    # ---- errors ------------------------------------------------------------------------------
    def _relay_error(self, resp: http.client.HTTPResponse, data: bytes, method: str, target: str) -> None:
        if resp.status == 304:
            return self._send(304, self._oss_headers(resp), b"")
        if not data.strip() and method == "HEAD":
            # HEAD errors carry no body: ask again with GET to learn the S3 error code
            again = self.server.shim.moto_request("GET", target, {"Range": "bytes=0-0"})
            data = again.read() if again.status >= 300 else b""
            again.close()
        root: ET.Element | None = None
        if data.strip():
            try:
                root = _parse_xml(data)
            except ET.ParseError:
                root = None
        if root is None or root.tag != "Error":
            code = {403: "AccessDenied", 404: "NoSuchKey", 412: "PreconditionFailed"}.get(resp.status, "InternalError")
            root = ET.Element("Error")
            ET.SubElement(root, "Code").text = code
            ET.SubElement(root, "Message").text = resp.reason or code
        self._send_moto_error(resp.status, root)

    def _send_moto_error(self, status: int, root: ET.Element) -> None:
        code = root.findtext("Code") or "InternalError"
        extra = {el.tag: el.text or "" for el in root if el.tag not in ("Code", "Message", "RequestId", "RequestID", "HostId")}
        self._send_error(status, _ERROR_CODES.get(code, code), root.findtext("Message") or code, extra)

    def _send_error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        root = ET.Element("Error")
        ET.SubElement(root, "Code").text = code
        ET.SubElement(root, "Message").text = message
        ET.SubElement(root, "RequestId").text = self._request_id
        ET.SubElement(root, "HostId").text = f"127.0.0.1:{self.server.shim.port}"
        for tag, text in (extra or {}).items():
            ET.SubElement(root, tag).text = text
        doc = _xml_bytes(root)
        headers = {"x-oss-request-id": self._request_id}
        if self.command == "HEAD":
            # OSS puts HEAD errors, which have no body, base64-encoded in x-oss-err
            headers["x-oss-err"] = base64.b64encode(doc).decode()
        self._send(status, headers, doc, content_type="application/xml")

    # ---- translation -------------------------------------------------------------------------
    def _s3_headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.headers.items():
            low = name.lower()
            if low in _HOP_BY_HOP or low in _SHIM_ONLY_HEADERS:
                continue
            if low in _ETAG_HEADERS:
                value = _lower_etag(value)
            if low == "x-oss-object-acl":
                out["x-amz-acl"] = value
            elif low.startswith("x-oss-"):
                out["x-amz-" + low[6:]] = value
            else:
                out[name] = value
        return out

    def _oss_headers(self, resp: http.client.HTTPResponse) -> dict[str, str]:
        out: dict[str, str] = {"x-oss-request-id": self._request_id}
        for name, value in resp.getheaders():
            low = name.lower()
            if low in ("etag",):
                out["ETag"] = _upper_etag(value)
            elif low.startswith("x-amz-meta-") or low in ("x-amz-version-id", "x-amz-delete-marker",
                                                          "x-amz-server-side-encryption", "x-amz-storage-class"):
                out["x-oss-" + low[6:]] = value
            elif low in ("last-modified", "content-type", "content-range", "content-encoding",
                         "content-disposition", "cache-control", "expires", "content-language", "location"):
                out[name] = value
        return out

    def _wants_url_encoding(self) -> bool:
        return any(k == "encoding-type" and v == "url" for k, v in _parse_query(urlsplit(self.path).query))

    # ---- sending -----------------------------------------------------------------------------
    def _send_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self._headers_sent = True

    def _send(self, status: int, headers: dict[str, str], body: bytes, content_type: str | None = None) -> None:
        if content_type and body:
            headers = {**headers, "Content-Type": content_type}
        self._send_headers(status, headers, len(body))
        if body and self.command != "HEAD":
            self.wfile.write(body)


# ---- helpers ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parse_query(query: str) -> list[tuple[str, str]]:
    """Query pairs, decoded; keeps blank values (`uploads`, `continuation-token=`)."""
    pairs = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        pairs.append((unquote(name.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs


def _build_query(params: list[tuple[str, str]]) -> str:
    """The query for moto: OSS-only parameters and empty markers dropped."""
    kept = [
        (k, v) for k, v in params
        if k not in _OSS_ONLY_PARAMS and not (k in _DROP_IF_EMPTY and v == "")
    ]
    if not kept:
        return ""
    return "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" if v else f"{quote(k, safe='')}="
                          for k, v in kept)


def _parse_xml(data: bytes) -> ET.Element:
    root = ET.fromstring(data)
    _strip_namespaces(root)
    return root


def _xml_bytes(root: ET.Element) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _upper_etags_in(root: ET.Element) -> None:
    for el in root.iter("ETag"):
        if el.text:
            el.text = _upper_etag(el.text)


def _fix_listing(root: ET.Element, *, encode: bool) -> None:
    """Make an S3 listing an OSS one: <Type> per entry, the markers oss2 requires, url-encoding."""
    truncated = (root.findtext("IsTruncated") or "false") == "true"
    if root.tag == "ListBucketResult":
        contents = root.findall("Contents")
        for item in contents:
            if item.find("Type") is None:
                ET.SubElement(item, "Type").text = _object_type(item.findtext("ETag") or "")
        if truncated and root.find("NextMarker") is None and root.find("NextContinuationToken") is None:
            # S3 v1 gives NextMarker only with a delimiter; OSS always does
            last = [*(c.findtext("Key") or "" for c in contents),
                    *(p.findtext("Prefix") or "" for p in root.findall("CommonPrefixes"))]
            ET.SubElement(root, "NextMarker").text = max(last) if last else ""
    elif root.tag == "ListMultipartUploadsResult":
        uploads = root.findall("Upload")
        for tag, field in (("NextKeyMarker", "Key"), ("NextUploadIdMarker", "UploadId")):
            if root.find(tag) is None:
                ET.SubElement(root, tag).text = (uploads[-1].findtext(field) or "") if truncated and uploads else ""
    if encode:
        for el in root.iter():
            if el.tag in _ENCODED_TAGS and el.text:
                el.text = quote(el.text, safe="")
        if root.find("EncodingType") is None:
            ET.SubElement(root, "EncodingType").text = "url"
