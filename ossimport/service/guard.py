"""What a web page on another site must not be able to do through the user's browser.

The service often runs on 127.0.0.1 without credentials; any page the user visits could then
post to it (a "simple" cross-site request needs no permission) or reach it under its own name
(DNS rebinding). So, on every request:
  - a browser's `Sec-Fetch-Site: cross-site`, or an `Origin` that is not the service itself, is
    refused (Forbidden.CSRF);
  - a loopback service answers only to loopback host names (Forbidden.Host), so a rebound name
    (evil.example -> 127.0.0.1) gets nothing;
  - the JSON door takes only `Content-Type: application/json`, which a page cannot send to
    another origin without a CORS preflight that the service never grants;
  - an unsigned RPC request must name its action in the `x-acs-action` header (a form or an
    image URL cannot set it; `Action=` alone is taken only from signed requests).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ossimport.service.errors import ApiError


def _loopback_name(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check(door: str, method: str, headers: dict[str, str], loopback: bool, signed: bool) -> None:
    """Refuse a request a foreign page could have made. `door`: json, rpc or other."""
    if headers.get("sec-fetch-site") == "cross-site":
        raise ApiError("Forbidden.CSRF", "a request from another web site is refused")
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
        raise ApiError("Forbidden.CSRF", "a request from another web site is refused (Origin is not this service)")
    if loopback and not _loopback_name(host):
        raise ApiError("Forbidden.Host", "this service listens on loopback: use http://127.0.0.1 or "
                       "http://localhost in the address")
    if door == "json" and method == "POST":
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError("InvalidParameter", "send the body with Content-Type: application/json")
    if door == "rpc" and not signed and "x-acs-action" not in headers:
        raise ApiError("Forbidden.CSRF", "an unsigned request must name its action in the x-acs-action header")
