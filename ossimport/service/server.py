"""The HTTP front: routes requests to the action dispatcher through its two doors, and serves
/metrics, /api/events (server-sent events), /openapi.json and the web UI.

    POST /api/<Action>            JSON body -> JSON answer (web UI, curl, scripts)
    POST|GET / (x-acs-action)     the Alibaba Cloud OpenAPI RPC door (official SDKs, aliyun CLI)

A thread per connection (ThreadingHTTPServer): handlers and the engine are plain blocking code.
Nothing here logs a query string or a body: both may hold credentials (SourceStorage, CreateJob).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ossimport.service import api, dataflow_api, guard, jobs_api, subtask_api  # noqa: F401 - register actions
from ossimport.service.auth import Nonces, Sessions, verify_basic, verify_signature
from ossimport.service.core import Service
from ossimport.service.errors import ApiError

log = logging.getLogger("ossimport.service")
MAX_BODY = 1024 * 1024
HOST_ID = "ossimport"


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`Filters.1.Key=a&Condition.Size=3` -> {"Filters": {"1": {"Key": "a"}}, "Condition": {"Size": "3"}}."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


class Handler(BaseHTTPRequestHandler):
    server: ServiceServer
    protocol_version = "HTTP/1.1"
    server_version = "ossimport"
    # headers and body go out in two writes: with Nagle on, a keep-alive client's delayed ACK
    # held every answer ~40 ms (bench/service.py: 171 -> 1,174 creates/s, 4 KiB subtask 92 -> 5 ms)
    disable_nagle_algorithm = True

    # ---- plumbing ---------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request line carries the query string: see request_done for what is logged

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError("InvalidParameter", f"the request body is over {MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

    def send_json(self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_bytes(self, status: int, data: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_error_answer(self, exc: ApiError) -> None:
        self.send_json(exc.status, {"RequestId": api.new_request_id(), "HostId": HOST_ID, "Code": exc.code,
                                    "Message": exc.message})

    # ---- routing ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        kind = "other"
        status = 200
        try:
            body = self._body()
            headers = self._headers()
            pairs = parse_qsl(url.query, keep_blank_values=True)
            if method == "POST" and url.path.startswith("/api/") and url.path != "/api/events":
                kind = "json"
            elif url.path == "/" and ("x-acs-action" in headers or any(k == "Action" for k, _ in pairs)):
                kind = "rpc"
            guard.check(kind, method, headers, self.server.loopback, signed=bool(self.server.service.credentials))
            if kind == "json":
                self._json_door(method, url.path, pairs, headers, body)
            elif kind == "rpc":
                self._rpc_door(method, url.path, pairs, headers, body)
            else:
                status = self.server.pages.handle(self, method, url.path, pairs, headers, body)
        except ApiError as exc:
            status = exc.status
            self.send_error_answer(exc)
        except (BrokenPipeError, ConnectionResetError):
            status = 499
        except Exception:  # noqa: BLE001 - a bug answers 500 with no detail that could hold a secret
            log.exception("internal error on %s %s", method, url.path)
            status = 500
            self.send_error_answer(ApiError("InternalError", "internal error; see the service log"))
        self.server.request_done(kind, url.path, status, time.monotonic() - started)

    def _json_door(self, method: str, path: str, pairs: list[tuple[str, str]], headers: dict[str, str],
                   body: bytes) -> None:
        name = path[len("/api/"):]
        self.server.authenticate(method, path, pairs, headers, body, json_door=True)
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            raise ApiError("InvalidParameter", "the body is not JSON") from None
        if not isinstance(params, dict):
            raise ApiError("InvalidParameter", "the body must be a JSON object of parameters")
        self.send_json(200, self.server.call(name, params))

    def _rpc_door(self, method: str, path: str, pairs: list[tuple[str, str]], headers: dict[str, str],
                  body: bytes) -> None:
        self.server.authenticate(method, path, pairs, headers, body, json_door=False)
        params = unflatten(pairs)
        if body and "application/x-www-form-urlencoded" in headers.get("content-type", ""):
            params.update(unflatten(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)))
        name = headers.get("x-acs-action") or params.pop("Action", "")
        for extra in ("Action", "Version", "Format", "RegionId"):
            params.pop(extra, None)
        self.send_json(200, self.server.call(str(name), params))


class ServiceServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        self.service = service
        self.closing = threading.Event()  # ends the open event streams on shutdown
        self.nonces = Nonces(service.db)
        self.sessions = Sessions(service.db)
        from ossimport.service import metrics, pages

        self.metrics = metrics.Metrics(service)
        self.pages = pages.Pages(self)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # --listen [::1]:PORT
        super().__init__(address, Handler)
        from ossimport.address import is_loopback_host

        self.loopback = is_loopback_host(address[0])

    def shutdown(self) -> None:
        self.closing.set()
        super().shutdown()

    def call(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        return api.dispatch(self.service, name, params)

    def authenticate(self, method: str, path: str, pairs: list[tuple[str, str]], headers: dict[str, str],
                     body: bytes, json_door: bool) -> None:
        creds = self.service.credentials
        if not creds:
            return
        if json_door and verify_basic(headers, creds):
            return
        if json_door and not headers.get("authorization"):
            sid = self.pages.session_id(headers)
            csrf = self.sessions.csrf(sid, creds) if sid else None
            if csrf is not None:
                # a GET changes nothing (the event stream, metrics): the cookie is enough
                if method != "GET" and not hmac.compare_digest(headers.get("x-csrf-token", "").encode(), csrf.encode()):
                    raise ApiError("Forbidden.CSRF", "the request lacks the page's CSRF token; reload the page")
                return
        verify_signature(method, path, pairs, headers, body, creds, self.nonces)

    def request_done(self, kind: str, path: str, status: int, seconds: float) -> None:
        self.metrics.request(kind, status, seconds)
        log.debug("%s %s -> %s (%.3f s)", kind, path, status, seconds)

