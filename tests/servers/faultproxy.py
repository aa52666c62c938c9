"""An HTTP/1.1 fault-injecting proxy for tests (`tc netem` is not available here).

    with FaultProxy("127.0.0.1", upstream_port) as proxy:
        proxy.add(Fault("slowdown", count=3, path=r"/top\\.txt$"))     # the next 3 matching requests
        proxy.add(Fault("reset_mid", probability=0.05))                   # seeded RNG, any request
        ... point the client at 127.0.0.1:proxy.port ...
        assert proxy.injected["slowdown"] == 3

The proxy listens on 127.0.0.1 and relays each request of a keep-alive client connection to the
upstream (one upstream connection per request, `Connection: close`). Requests and responses are
buffered whole (test objects are small), which lets it damage a response precisely:

  request phase (decided when the request headers arrived)
    internal_error   answer 500 InternalError (S3 XML body) without forwarding
    slowdown         answer 503 SlowDown (S3 XML body) without forwarding
    access_denied    answer 403 AccessDenied (S3 XML body) without forwarding: a permission the
                     credentials lack
    reset_before     reset the connection (RST: SO_LINGER 0, close) without forwarding
    slow_up          read the request body at `bps` bytes/s (a slow uplink; forwarded afterwards)
  response phase (decided once the upstream answered)
    reset_mid        send `keep` bytes of the response (default: half), then RST
    truncate         send the headers with the full Content-Length and `keep` bytes of the body
                     (default: half), then close; only responses with a body of >= 2 bytes
    stall            hold the response for `seconds`, then send it (if the client still listens)
    stall_body       send the status line and headers, hold the body for `seconds`, then send it
                     (a stall before the first body byte); only responses with a body
    slow_down        send the response at `bps` bytes/s (a slow downlink)

A `Fault` fires for the next `count` matching requests, or with `probability` (RNG seeded by the
proxy's `seed`), optionally only for a method and a path regex (searched in the URL path, without
the query string; object keys are percent-encoded there). `slow_up` / `slow_down` rules share one
token bucket per rule: a link of that capacity. Every method is thread-safe. `injected` counts
what really happened per kind; `records` keeps every request with its fault and timing.

Besides faults, the proxy can reshape what passes, to make a real server answer the way another
one does (tests/test_etags_not_md5.py: answers for SSE-KMS objects): `shape_request(method,
query, body) -> body` and `shape_response(method, path, headers, body) -> (headers, body)`.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

REQUEST_KINDS = frozenset({"internal_error", "slowdown", "access_denied", "reset_before", "slow_up"})
RESPONSE_KINDS = frozenset({"reset_mid", "truncate", "stall", "stall_body", "slow_down"})
KINDS = REQUEST_KINDS | RESPONSE_KINDS

_ERRORS = {
    "internal_error": (500, "Internal Server Error", "InternalError",
                       "We encountered an internal error. Please try again."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "access_denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
}
_MAX_HEADER = 64 * 1024
Headers = list[tuple[str, str]]
RequestShaper = Callable[[str, str, bytes], bytes]  # (method, query, body) -> body
ResponseShaper = Callable[[str, str, Headers, bytes], tuple[Headers, bytes]]  # (method, path, headers, body)


@dataclass
class Fault:
    """One injection rule. Give `count` (the next N matching requests) or `probability`."""

    kind: str
    count: int | None = None
    probability: float | None = None
    method: str | None = None  # e.g. "GET"; None: any
    path: str | None = None  # regex searched in the decoded URL path; None: any
    seconds: float = 0.0  # stall
    bps: float = 0.0  # slow_up / slow_down: bytes per second
    keep: int | None = None  # reset_mid / truncate: bytes of the response (body) sent before it breaks
    query: str | None = None  # regex searched in the raw query string; None: any
    # ---- state, guarded by the proxy's lock
    fired: int = field(default=0, init=False)
    _link_free_at: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(KINDS)}")
        if (self.count is None) == (self.probability is None):
            raise ValueError("give exactly one of count and probability")
        if self.kind in ("slow_up", "slow_down") and self.bps <= 0:
            raise ValueError(f"{self.kind} needs bps > 0")
        if self.kind in ("stall", "stall_body") and self.seconds <= 0:
            raise ValueError(f"{self.kind} needs seconds > 0")

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        return self.query is None or bool(re.search(self.query, query))


@dataclass
class Record:
    """One request as the proxy saw it."""

    method: str
    path: str  # decoded, without the query
    query: str
    started: float  # time.monotonic() when the request headers arrived
    request_faults: list[str] = field(default_factory=list)
    response_faults: list[str] = field(default_factory=list)
    status: int | None = None  # the status sent (or that would have been sent) to the client
    stalled: float = 0.0  # seconds the response was (or is being) held by a stall
    body_received: int = 0  # request body bytes read from the client so far
    finished: float | None = None


class _Reset(Exception):
    """The client connection was reset on purpose: stop serving it."""


class _ClientGone(Exception):
    """The client closed its connection (or it broke): stop serving it."""


class FaultProxy:
    """A threaded fault proxy on 127.0.0.1 in front of `upstream_host:upstream_port`."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 0,
                 upstream_timeout: float = 30.0, shape_request: RequestShaper | None = None,
                 shape_response: ResponseShaper | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.shape_request, self.shape_response = shape_request, shape_response
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: list[Fault] = []
        self._injected: Counter[str] = Counter()
        self._records: list[Record] = []
        self._bytes_up = 0  # request bytes (headers and bodies) read from clients
        self._bytes_down = 0  # response bytes written to clients
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._started = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        if not self._started:
            self._started = True
            self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every client connection; wait for the threads (bounded)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() (Linux)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        if self._started:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- control (thread-safe) -----------------------------------------------------------------
    def add(self, *faults: Fault) -> None:
        with self._lock:
            self._rules.extend(faults)

    def clear(self) -> None:
        """Remove every rule (counters and records stay)."""
        with self._lock:
            self._rules.clear()

    def reset_counters(self) -> None:
        with self._lock:
            self._injected.clear()
            self._records.clear()
            self._bytes_up = self._bytes_down = 0

    def pending(self) -> list[Fault]:
        """Count rules that have not fired their full count yet."""
        with self._lock:
            return [r for r in self._rules if r.count is not None and r.fired < r.count]

    @property
    def injected(self) -> Counter[str]:
        with self._lock:
            return Counter(self._injected)

    @property
    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._bytes_down

    def body_received(self, path_regex: str, method: str | None = None) -> int:
        """Request body bytes read so far for requests whose path matches (in flight included)."""
        with self._lock:
            return sum(r.body_received for r in self._records
                       if re.search(path_regex, r.path) and (method is None or r.method == method))

    def wait_until(self, predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
        """Poll `predicate` until true or `timeout` seconds passed; returns its last value."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline or self._stop.is_set():
                return bool(predicate())
            time.sleep(interval)

    # ---- internals: rules ----------------------------------------------------------------------
    def _pick(self, kinds: frozenset[str], rec: Record, response_body: int | None = None) -> Fault | None:
        """The first rule of `kinds` that matches and fires now; counts it as injected."""
        with self._lock:
            for rule in self._rules:
                if rule.kind not in kinds or not rule.matches(rec.method, rec.path, rec.query):
                    continue
                if rule.kind == "truncate" and (response_body is None or response_body < 2):
                    continue  # nothing to cut: leave the fault for a response that has a body
                if rule.kind == "stall_body" and not response_body:
                    continue  # no body to hold back
                if rule.count is not None:
                    if rule.fired >= rule.count:
                        continue
                elif self._rng.random() >= (rule.probability or 0.0):
                    continue
                rule.fired += 1
                self._injected[rule.kind] += 1
                return rule
        return None

    def _throttle(self, rule: Fault, n: int) -> None:
        """Wait until `n` more bytes fit through the rule's link (a shared token bucket)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, rule._link_free_at)
            rule._link_free_at = start + n / rule.bps
            until = rule._link_free_at
        self._stop.wait(max(0.0, until - time.monotonic()))

    # ---- internals: serving ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb", buffering=256 * 1024)
        try:
            while not self._stop.is_set():
                if not self._one_request(conn, rfile):
                    break
        except (_Reset, _ClientGone, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                rfile.close()
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def _one_request(self, conn: socket.socket, rfile: BinaryIO) -> bool:
        """Serve one request; False when the connection is to be closed."""
        head = _read_head(rfile)
        if head is None:
            return False
        request_line, headers = _parse_head(head)
        try:
            method, target, version = request_line.split(" ", 2)
        except ValueError:
            return False
        split = urlsplit(target)
        rec = Record(method, unquote(split.path), split.query, time.monotonic())
        with self._lock:
            self._records.append(rec)
            self._bytes_up += len(head)
        expect = _header(headers, "expect").lower() == "100-continue"

        fault = self._pick(REQUEST_KINDS, rec)
        if fault is not None:
            rec.request_faults.append(fault.kind)
        if fault is not None and fault.kind == "reset_before":
            rec.finished = time.monotonic()
            _rst(conn)
            raise _Reset
        if fault is not None and fault.kind in _ERRORS:
            status, reason, code, message = _ERRORS[fault.kind]
            rec.status = status
            keep_alive = not expect  # with Expect the client never sends the body: close after answering
            if not expect:
                self._read_body(rfile, headers, rec, None)
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><Resource>{split.path}</Resource>"
                    f"<RequestId>faultproxy</RequestId></Error>").encode()
            hdrs = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                    ("x-amz-request-id", "faultproxy")]
            if not keep_alive:
                hdrs.append(("Connection", "close"))
            self._send(conn, _build_head(f"HTTP/1.1 {status} {reason}", hdrs) + body)
            rec.finished = time.monotonic()
            return keep_alive

        if expect:
            self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        slow_up = fault if fault is not None and fault.kind == "slow_up" else None
        body = self._read_body(rfile, headers, rec, slow_up)

        # forward: one upstream connection per request
        fwd_headers = [(k, v) for k, v in headers if k.lower() not in ("expect", "connection", "keep-alive")]
        if self.shape_request is not None:
            body = self.shape_request(method, split.query, body)
            fwd_headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in fwd_headers]
        fwd_headers.append(("Connection", "close"))
        resp_status, resp_head, resp_body = self._forward(
            _build_head(f"{method} {target} {version}", fwd_headers) + body, method, rec.path
        )
        rec.status = resp_status
        data = resp_head + resp_body

        rfault = self._pick(RESPONSE_KINDS, rec, len(resp_body))
        if rfault is not None:
            rec.response_faults.append(rfault.kind)
        try:
            if rfault is None:
                self._send(conn, data)
            elif rfault.kind in ("stall", "stall_body"):
                rec.stalled = rfault.seconds
                held = data
                if rfault.kind == "stall_body":
                    self._send(conn, resp_head)
                    held = resp_body
                if self._stop.wait(rfault.seconds):
                    return False
                self._send(conn, held)
            elif rfault.kind == "slow_down":
                for i in range(0, len(data), 16 * 1024):
                    chunk = data[i:i + 16 * 1024]
                    self._throttle(rfault, len(chunk))
                    self._send(conn, chunk)
            elif rfault.kind == "reset_mid":
                keep = rfault.keep if rfault.keep is not None else max(1, len(data) // 2)
                self._send(conn, data[:min(keep, len(data) - 1)])
                _rst(conn)
                raise _Reset
            elif rfault.kind == "truncate":
                keep = rfault.keep if rfault.keep is not None else len(resp_body) // 2
                self._send(conn, resp_head + resp_body[:min(keep, len(resp_body) - 1)])
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)  # a clean FIN: the body simply ends early
                return False
        finally:
            rec.finished = time.monotonic()
        return True

    def _read_body(self, rfile: BinaryIO, headers: list[tuple[str, str]], rec: Record,
                   slow: Fault | None) -> bytes:
        if _header(headers, "transfer-encoding").lower() == "chunked":
            return self._read_chunked(rfile, rec, slow)
        length = int(_header(headers, "content-length") or 0)
        parts: list[bytes] = []
        left = length
        while left > 0:
            n = min(left, 16 * 1024 if slow is not None else 256 * 1024)
            if slow is not None:
                self._throttle(slow, n)
            chunk = rfile.read(n)
            if not chunk:
                raise _ClientGone
            parts.append(chunk)
            left -= len(chunk)
            self._count_up(rec, len(chunk))
        return b"".join(parts)

    def _read_chunked(self, rfile: BinaryIO, rec: Record, slow: Fault | None) -> bytes:
        """The raw chunked body (forwarded as it came)."""
        out = bytearray()
        while True:
            line = rfile.readline(_MAX_HEADER)
            if not line:
                raise _ClientGone
            out += line
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers up to the blank line
                    t = rfile.readline(_MAX_HEADER)
                    if not t:
                        raise _ClientGone
                    out += t
                    if t in (b"\r\n", b"\n"):
                        return bytes(out)
            if slow is not None:
                self._throttle(slow, size + 2)
            chunk = rfile.read(size + 2)
            if len(chunk) != size + 2:
                raise _ClientGone
            out += chunk
            self._count_up(rec, len(chunk))

    def _count_up(self, rec: Record, n: int) -> None:
        with self._lock:
            rec.body_received += n
            self._bytes_up += n

    def _forward(self, request: bytes, method: str, path: str) -> tuple[int, bytes, bytes]:
        """(status, response head as bytes to relay, body) of the upstream's answer."""
        with socket.create_connection(self.upstream, timeout=self.upstream_timeout) as up:
            up.sendall(request)
            ufile = up.makefile("rb", buffering=256 * 1024)
            try:
                while True:
                    head = _read_head(ufile)
                    if head is None:
                        raise OSError("the upstream closed the connection without answering")
                    status_line, headers = _parse_head(head)
                    status = int(status_line.split(" ", 2)[1])
                    if status >= 200 or status == 101:
                        break  # skip interim 1xx answers
                if method == "HEAD" or status in (204, 304):
                    body = b""
                elif _header(headers, "transfer-encoding").lower() == "chunked":
                    body = _read_chunked_plain(ufile)
                    headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
                    headers.append(("Content-Length", str(len(body))))
                elif _header(headers, "content-length"):
                    body = _read_exactly(ufile, int(_header(headers, "content-length")))
                else:
                    body = ufile.read()
                    headers.append(("Content-Length", str(len(body))))
            finally:
                ufile.close()
        relay = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
        if self.shape_response is not None:
            shaped, new_body = self.shape_response(method, path, relay, body)
            if len(new_body) != len(body):  # (a HEAD's Content-Length is the object's: kept)
                shaped = [(k, str(len(new_body)) if k.lower() == "content-length" else v) for k, v in shaped]
            relay, body = shaped, new_body
        return status, _build_head(status_line, relay), body

    def _send(self, conn: socket.socket, data: bytes) -> None:
        try:
            conn.sendall(data)
        except OSError as exc:
            raise _ClientGone from exc
        with self._lock:
            self._bytes_down += len(data)


# ---- HTTP helpers -------------------------------------------------------------------------------
def _read_head(f: BinaryIO) -> bytes | None:
    """Bytes up to and including the blank line; None on a clean EOF before anything came."""
    lines: list[bytes] = []
    total = 0
    while True:
        line = f.readline(_MAX_HEADER)
        if not line:
            if lines:
                raise _ClientGone
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue  # stray CRLF between requests
        lines.append(line)
        total += len(line)
        if total > _MAX_HEADER:
            raise _ClientGone
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.append((k.strip(), v.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v
    return ""


def _build_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise OSError(f"the upstream sent {len(data)} of {n} body bytes")
    return data


def _read_chunked_plain(f: BinaryIO) -> bytes:
    out = bytearray()
    while True:
        line = f.readline(_MAX_HEADER)
        if not line:
            raise OSError("the upstream closed a chunked body early")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while f.readline(_MAX_HEADER) not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += _read_exactly(f, size)
        _read_exactly(f, 2)


def _rst(conn: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.close()
