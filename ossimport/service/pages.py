"""Everything but the two API doors: /metrics, /api/events, /openapi.json, the web UI's static
files (no CDN, no build step) and its login.

With service credentials set, the UI asks for them once (POST /login) and then holds a session
cookie (HttpOnly, SameSite=Strict) plus a CSRF token that its scripts send in X-CSRF-Token;
POST /logout (with that token) ends the session. Sessions live in the database (auth.Sessions).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import mimetypes
import queue
import typing
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ossimport.service import api
from ossimport.service.errors import CODES, ApiError

STATIC = Path(__file__).resolve().parent / "static"
SSE_PING = 15.0  # seconds between keep-alive comments on an idle event stream


def openapi() -> dict[str, Any]:
    """The JSON door described for tools: one POST path per action, its typed request."""
    names = {str: "string", int: "integer", bool: "boolean"}
    paths: dict[str, Any] = {}
    for act in sorted(api.ACTIONS.values(), key=lambda a: a.name):
        hints = typing.get_type_hints(act.request)
        props: dict[str, Any] = {}
        required = []
        for f in dataclasses.fields(act.request):
            kind = hints[f.name]
            origin = typing.get_origin(kind)
            props[f.name] = ({"type": "array", "items": {"type": "object"}} if origin is list else
                             {"type": "object"} if (origin is dict or kind is dict) else
                             {"type": names[kind]} if kind in names else {})
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        paths[f"/api/{act.name}"] = {"post": {
            "operationId": act.name, "summary": act.doc.splitlines()[0] if act.doc else act.name,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "the action's answer, with RequestId"},
                          "default": {"description": "an error",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ossimport service", "version": "2017-06-26",
                 "description": "The JSON door of the service. The same actions answer on the Alibaba Cloud "
                                "OpenAPI RPC door (POST / with x-acs-action), signed with ACS3-HMAC-SHA256."},
        "paths": paths,
        "components": {"schemas": {"Error": {"type": "object", "properties": {
            "RequestId": {"type": "string"}, "HostId": {"type": "string"},
            "Code": {"type": "string", "enum": sorted(CODES)}, "Message": {"type": "string"}}}}},
    }


class Pages:
    def __init__(self, server: Any) -> None:
        self.server = server

    def session_id(self, headers: dict[str, str]) -> str:
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie is no session
            return ""
        morsel = cookie.get("ossimport_session")
        return morsel.value if morsel else ""

    def _logged_in(self, headers: dict[str, str]) -> str | None:
        """The session's CSRF token; "" when no login is needed; None when one is."""
        if not self.server.service.credentials:
            return ""
        sid = self.session_id(headers)
        return self.server.sessions.csrf(sid, self.server.service.credentials) if sid else None

    def handle(self, h: Any, method: str, path: str, pairs: list[tuple[str, str]], headers: dict[str, str],
               body: bytes) -> int:
        if path == "/metrics" and method == "GET":
            self.server.authenticate(method, path, pairs, headers, body, json_door=True)
            h.send_bytes(200, self.server.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            return 200
        if path == "/openapi.json" and method == "GET":
            h.send_json(200, openapi())
            return 200
        if path == "/api/events" and method == "GET":
            self.server.authenticate(method, path, pairs, headers, body, json_door=True)
            self._events(h)
            return 200
        if path == "/login" and method == "POST":
            return self._login(h, body)
        if path == "/logout" and method == "POST":
            return self._logout(h, headers, body)
        if method == "GET":
            return self._static(h, path, headers)
        raise ApiError("InvalidAction.NotFound", f"no such resource: {method} {path}")

    def _events(self, h: Any) -> None:
        events = self.server.service.events
        q = events.listen()
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-store")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            h.wfile.write(b": connected\n\n")
            h.wfile.flush()
            while not self.server.closing.is_set():
                try:
                    message = q.get(timeout=SSE_PING)
                except queue.Empty:
                    message = ": ping\n\n"
                h.wfile.write(message.encode())
                h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            events.leave(q)

    def _login(self, h: Any, body: bytes) -> int:
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        creds = self.server.service.credentials
        secret = creds.get(form.get("AccessKeyId", ""))
        if secret is None or not hmac.compare_digest(secret.encode(), form.get("AccessKeySecret", "").encode()):
            h.send_bytes(303, b"", "text/plain", {"Location": "/login.html?failed=1"})
            return 303
        sid, _ = self.server.sessions.create(form["AccessKeyId"], secret)
        h.send_bytes(303, b"", "text/plain", {
            "Location": "/", "Set-Cookie": f"ossimport_session={sid}; HttpOnly; SameSite=Strict; Path=/"})
        return 303

    def _logout(self, h: Any, headers: dict[str, str], body: bytes) -> int:
        """End the session (the page's form sends its CSRF token, so another page cannot sign the
        user out) and clear the cookie. A cookie that is no live session is just cleared."""
        sid = self.session_id(headers)
        csrf = self._logged_in(headers) if sid else None
        if csrf:
            given = dict(parse_qsl(body.decode("utf-8", "replace"))).get("csrf") or headers.get("x-csrf-token", "")
            if not hmac.compare_digest(given.encode(), csrf.encode()):
                raise ApiError("Forbidden.CSRF", "the sign-out lacks the page's CSRF token; reload the page")
            self.server.sessions.end(sid)
        h.send_bytes(303, b"", "text/plain", {
            "Location": "/login.html" if self.server.service.credentials else "/",
            "Set-Cookie": "ossimport_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"})
        return 303

    def _static(self, h: Any, path: str, headers: dict[str, str]) -> int:
        name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
        if name == "index.html":
            csrf = self._logged_in(headers)
            if csrf is None:
                h.send_bytes(303, b"", "text/plain", {"Location": "/login.html"})
                return 303
        target = (STATIC / name).resolve()
        if not target.is_file() or STATIC not in target.parents:
            raise ApiError("InvalidAction.NotFound", f"no such page: {path}")
        data = target.read_bytes()
        if name == "index.html":  # the page's scripts read the CSRF token from this meta tag
            data = data.replace(b"{{csrf}}", json.dumps(self._logged_in(headers) or "").strip('"').encode())
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        h.send_bytes(200, data, f"{kind}; charset=utf-8" if kind.startswith("text/") or kind.endswith("script")
                     else kind, {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"})
        return 200
