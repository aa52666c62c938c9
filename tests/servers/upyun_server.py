"""An UpYun REST API test double: the requests ossimport's upyun source sends, answered as the
UpYun docs describe them (docs.upyun.com/api/rest_api/, /api/authorization/, /api/errno/).

No UpYun server runs offline. This one keeps services (UpYun's "buckets") in memory, each a dict
of file path -> (bytes, unix seconds); directories are implied by the paths, as UpYun creates
them on upload. It answers:

- authentication: `Authorization: UPYUN <operator>:<Base64(HMAC-SHA1(MD5(password) hex,
  METHOD&URI&DATE))>` with URI the raw request path, checked against the `Date` header, which
  must lie within 30 minutes of this server's clock (`clock_offset` moves that clock). A wrong
  signature, an unknown operator or a missing Date: 401 with UpYun's JSON error body;
- GET /<service>/<dir>/ with `Accept: application/json`: one page of the directory (its files
  and subdirectories, sorted by plain name as strings sort, so a directory `a` comes before a
  file `a!`: not byte order), `x-list-limit` entries but at most `page_size` (small, so that
  clients page), the next page's marker in `iter`, END_ITER on the last page;
- HEAD: x-upyun-file-type (file / folder), x-upyun-file-size, x-upyun-file-date;
- GET of a file, whole (200) or one byte range (206; 416 past the end);
- 404 {"msg": "file or directory not found", "code": 40400001} for a missing path or service.

    server = UpYunServer({"operator": "password"})
    server.start()
    server.put("svc", "docs/a.txt", b"...")
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

END_ITER = "g2gCZAAEbmV4dGQAA2VvZg"
SKEW = 30 * 60  # seconds a request's Date may differ from the server's clock


class UpYunServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, operators: dict[str, str], page_size: int = 3) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.operators = dict(operators)
        self.page_size = page_size
        self.clock_offset = 0.0  # seconds added to this server's clock
        self.services: dict[str, dict[str, tuple[bytes, int]]] = {}
        self.lock = threading.Lock()
        self.list_pages = 0  # listing pages served: tests check that paging happened
        self.refused = 0  # requests answered 401
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> int:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="upyun", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop serving and end the handler threads waiting on keep-alive connections."""
        self.shutdown()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()
        if self._thread:
            self._thread.join(10)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self._sockets.discard(request)
        super().shutdown_request(request)

    def put(self, service: str, path: str, data: bytes, mtime: int | None = None) -> None:
        with self.lock:
            self.services.setdefault(service, {})[path.lstrip("/")] = (data, int(time.time() if mtime is None else mtime))

    def create_service(self, service: str) -> None:
        with self.lock:
            self.services.setdefault(service, {})

    # ---- what a path names -----------------------------------------------------------------
    def lookup(self, service: str, path: str) -> tuple[str, Any]:
        """("file", (bytes, mtime)), ("folder", [(name, is_dir, size, mtime)]) or ("missing", None)."""
        with self.lock:
            files = self.services.get(service)
            if files is None:
                return "missing", None
            path = path.strip("/")
            if path in files:
                return "file", files[path]
            base = path + "/" if path else ""
            children: dict[str, tuple[bool, int, int]] = {}
            for key, (data, mtime) in files.items():
                if not key.startswith(base):
                    continue
                name, slash, _ = key[len(base):].partition("/")
                if slash:
                    _, _, newest = children.get(name, (True, 0, 0))
                    children[name] = (True, 0, max(newest, mtime))
                else:
                    children[name] = (False, len(data), mtime)
        if not children and path:
            return "missing", None
        return "folder", sorted((n, *v) for n, v in children.items())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: UpYunServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # ---- answers ---------------------------------------------------------------------------
    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", send_body: bool = True) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", uuid.uuid4().hex)
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _error(self, status: int, code: int, msg: str, send_body: bool) -> None:
        body = json.dumps({"msg": msg, "code": code, "id": uuid.uuid4().hex}).encode()
        self._send(status, {"Content-Type": "application/json"}, body, send_body)

    def _authorized(self, send_body: bool) -> bool:
        date = self.headers.get("Date", "")
        auth = self.headers.get("Authorization", "")
        operator, _, signature = auth.removeprefix("UPYUN ").partition(":")
        password = self.server.operators.get(operator)
        if not auth.startswith("UPYUN ") or password is None:
            self.server.refused += 1
            self._error(401, 40100006, "user not exist", send_body)
            return False
        if not date:
            self.server.refused += 1
            self._error(401, 40100001, "need date header", send_body)
            return False
        key = hashlib.md5(password.encode()).hexdigest().encode()
        uri = self.path.split("?", 1)[0]
        want = base64.b64encode(hmac.new(key, f"{self.command}&{uri}&{date}".encode(), hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(want, signature):
            self.server.refused += 1
            self._error(401, 40100005, "signature error", send_body)
            return False
        try:
            sent = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            sent = 0.0
        if abs(time.time() + self.server.clock_offset - sent) > SKEW:
            self.server.refused += 1
            self._error(401, 40100002, "date offset error", send_body)
            return False
        return True

    def _serve(self, body: bool) -> None:
        if not self._authorized(body):
            return
        service, _, path = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        kind, found = self.server.lookup(service, path)
        if kind == "missing":
            return self._error(404, 40400001, "file or directory not found", body)
        if kind == "folder":
            if not body:
                return self._send(200, {"x-upyun-file-type": "folder", "x-upyun-file-size": "0",
                                        "x-upyun-file-date": str(int(time.time()))}, send_body=False)
            return self._list(found)
        data, mtime = found
        if not body:
            return self._send(200, {"x-upyun-file-type": "file", "x-upyun-file-size": str(len(data)),
                                    "x-upyun-file-date": str(mtime)}, send_body=False)
        self._file(data, mtime)

    def _list(self, children: list[tuple[str, bool, int, int]]) -> None:
        if self.headers.get("x-list-order", "asc") == "desc":
            children = children[::-1]
        marker = self.headers.get("x-list-iter", "")
        try:
            offset = int(base64.urlsafe_b64decode(marker + "==").decode()) if marker else 0
        except ValueError:
            return self._error(400, 40001005, "iter args invalid", True)
        try:
            limit = max(1, min(int(self.headers.get("x-list-limit", "100")), self.server.page_size))
        except ValueError:
            limit = self.server.page_size
        page = children[offset:offset + limit]
        after = offset + len(page)
        iter_ = END_ITER if after >= len(children) else base64.urlsafe_b64encode(str(after).encode()).decode().rstrip("=")
        files = [{"name": name, "type": "folder" if is_dir else "application/octet-stream",
                  "length": size, "last_modified": mtime} for name, is_dir, size, mtime in page]
        self.server.list_pages += 1
        if "application/json" in self.headers.get("Accept", ""):
            payload = json.dumps({"files": files, "iter": iter_}).encode()
            return self._send(200, {"Content-Type": "application/json"}, payload)
        # without JSON: one "name\ttype\tsize\ttime" line per entry (N file, F folder), the marker in a header
        lines = "\n".join(f"{f['name']}\t{'F' if f['type'] == 'folder' else 'N'}\t{f['length']}\t{f['last_modified']}"
                          for f in files)
        self._send(200, {"Content-Type": "text/plain", "x-upyun-list-iter": iter_}, lines.encode())

    def _file(self, data: bytes, mtime: int) -> None:
        size = len(data)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "Last-Modified": email.utils.formatdate(mtime, usegmt=True)}
        rng = self.headers.get("Range", "")
        if not rng.startswith("bytes=") or "," in rng:
            return self._send(200, headers, data)
        first, _, last = rng[6:].strip().partition("-")
        try:
            if first:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            else:  # the last N bytes
                start, end = max(size - int(last), 0), size - 1
        except ValueError:
            return self._error(400, 40001161, "wrong range", True)
        if start >= size or start > end:
            return self._send(416, {"Content-Range": f"bytes */{size}"})
        self._send(206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}, data[start:end + 1])
