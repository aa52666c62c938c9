"""The read-only HTTP list source: a directory served over HTTP/1.1 on 127.0.0.1 plus URL list files.

The server is a small threaded http.server handler written for the tests, because the stdlib's
SimpleHTTPRequestHandler knows neither Range nor keep-alive: GET/HEAD with Content-Length,
Last-Modified, ETag, single byte ranges (206 / 416) and 404 for anything missing. URL
/ROOT/KEY serves the file www/ROOT/quote(KEY).
"""

from __future__ import annotations

import email.utils
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

NAME = "http"
READ_ONLY = True
_CHUNK = 64 * 1024


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_HEAD(self) -> None:
        server = self.server
        with server.heads:
            server.heads_in_flight += 1
            server.most_heads_in_flight = max(server.most_heads_in_flight, server.heads_in_flight)
            server.heads.notify_all()
            # hold_heads: answer once that many HEADs are in flight together (1 s at most), so a
            # test sees how many a client sends at once
            server.heads.wait_for(lambda: server.heads_in_flight >= server.hold_heads, timeout=1.0)
        try:
            self._serve(body=False)
        finally:
            with server.heads:
                server.heads_in_flight -= 1

    def do_GET(self) -> None:
        self._serve(body=True)

    def _file(self) -> Path | None:
        root, _, key = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        if not root or root.startswith(".") or "/" in root or not key:
            return None
        path = self.server.root / root / _stored_name(key)
        return path if path.is_file() else None

    def _serve(self, body: bool) -> None:
        self.server.requests += 1
        path = self._file()
        if path is None:
            return self._empty(404)
        st = path.stat()
        size = st.st_size
        status, start, end = byte_range(self.headers.get("Range", "") if self.server.honour_range else "", size)
        if status == 416:
            return unsatisfiable(self, size)
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with path.open("rb") as f:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def byte_range(header: str, size: int) -> tuple[int, int, int]:
    """(status, first, last byte) of the answer to a Range header (one range or none) for an
    object of `size` bytes: 200 for the whole object, 206 for a range, 416 when unsatisfiable."""
    if not header.startswith("bytes=") or "," in header:
        return 200, 0, size - 1
    first, _, last = header[6:].strip().partition("-")
    try:
        if first:
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
        else:  # suffix range: the last N bytes
            start, end = max(size - int(last), 0), size - 1
    except ValueError:
        return 200, 0, size - 1  # malformed: ignore the header, as RFC 9110 allows
    if start >= size or start > end:
        return 416, 0, -1
    return 206, start, end


def unsatisfiable(handler: BaseHTTPRequestHandler, size: int) -> None:
    """Answer 416 for an object of `size` bytes."""
    handler.send_response(416)
    handler.send_header("Content-Range", f"bytes */{size}")
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def _stored_name(key: str) -> str:
    """Objects are flat files named by their quoted key: URLs "a" and "a/x" can both exist, as they
    can on a web server backed by an object store, which nested files could not express."""
    return quote(key, safe="")


class Server(ThreadingHTTPServer):
    """A threaded server on a free 127.0.0.1 port that can be stopped with its keep-alive
    connections (`stop`); `handler` answers the requests (tests/servers/qiniu_domain.py has another)."""

    daemon_threads = True

    def __init__(self, root: Path, handler: type[BaseHTTPRequestHandler] = RangeHandler) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.root = root
        self.requests = 0
        self.connections = 0  # accepted TCP connections: tests check keep-alive reuse
        self.honour_range = True  # False: answer every GET with the whole file (200), as some servers do
        self.heads = threading.Condition()
        self.heads_in_flight = 0
        self.most_heads_in_flight = 0
        self.hold_heads = 0

        self.open_sockets: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open_sockets.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        """Stop serving and end the handler threads still waiting on keep-alive connections."""
        self.shutdown()
        for sock in list(self.open_sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()


@dataclass
class Handle:
    server: Server
    thread: threading.Thread
    tmp: Path
    www: Path

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


def serve(root: Path) -> tuple[Server, threading.Thread]:
    """Serve `root` on a free 127.0.0.1 port; stop with server.stop()."""
    server = Server(root)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="http-range", daemon=True)
    thread.start()
    return server, thread


def start(tmp: Path) -> Handle:
    www = tmp / "www"
    www.mkdir(parents=True, exist_ok=True)
    server, thread = serve(www)
    return Handle(server, thread, tmp, www)


def stop(handle: Handle) -> None:
    handle.server.stop()
    handle.thread.join(10)


def _list_file(handle: Handle, root: str) -> Path:
    return handle.tmp / f"{root}.list"


def address(handle: Handle, root: str) -> str:
    _list_file(handle, root).touch()  # an empty root is an empty list
    return f"list://{handle.tmp}/{root}.list"


def env(handle: Handle) -> dict[str, str]:
    return {}


def seed(handle: Handle, root: str, files: dict[str, bytes]) -> None:
    lines = []
    for key, data in files.items():
        (handle.www / root).mkdir(parents=True, exist_ok=True)
        (handle.www / root / _stored_name(key)).write_bytes(data)
        lines.append(f"http://127.0.0.1:{handle.port}/{root}/ {key}\n")
    with _list_file(handle, root).open("a", encoding="utf-8") as f:
        f.writelines(lines)
