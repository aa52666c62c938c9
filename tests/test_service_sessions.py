"""Web UI logins over real HTTP: a session outlives a kill -9 and restart of the service, an
expired or signed-out one is refused, changing the service's key pair signs everyone out, and the
database never holds a session id (the cookie) itself."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from jobenv import write_properties
from serviceenv import ServiceEnv

from ossimport.jobs.config import read_properties

AK, SK = "sessAccessKey01", "sess/Secret+Key=01"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ServiceEnv]:
    env = ServiceEnv(tmp_path, {"serviceAccessKeyId": AK, "serviceAccessKeySecret": SK}, workers=False)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def send(svc: ServiceEnv, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         sid: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed (the login's 303 carries the cookie)."""
    url = urlsplit(svc.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        extra = dict(headers or {})
        if sid:
            extra["Cookie"] = f"ossimport_session={sid}"
        conn.request(method, path, body=body, headers=extra)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def login(svc: ServiceEnv, sk: str = SK) -> str:
    status, headers, _ = send(svc, "POST", "/login", urlencode({"AccessKeyId": AK, "AccessKeySecret": sk}).encode(),
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and headers["location"] == "/", headers
    m = re.match(r"ossimport_session=([^;]+);", headers["set-cookie"])
    assert m, headers["set-cookie"]
    return m[1]


def page_csrf(svc: ServiceEnv, sid: str) -> str | None:
    """The CSRF token of the signed-in page; None when the page sends the browser to the login."""
    status, headers, body = send(svc, "GET", "/", sid=sid)
    if status == 303:
        assert headers["location"] == "/login.html"
        return None
    assert status == 200
    m = re.search(rb'<meta name="csrf-token" content="([^"]*)">', body)
    assert m and m[1]
    return m[1].decode()


def describe_jobs(svc: ServiceEnv, sid: str, csrf: str) -> tuple[int, str]:
    status, _, body = send(svc, "POST", "/api/DescribeJobs", b"{}",
                           {"Content-Type": "application/json", "X-CSRF-Token": csrf}, sid=sid)
    return status, json.loads(body).get("Code", "")


def rows(db: Path) -> dict[str, float]:
    """id_hash -> expires, read as another process would."""
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT id_hash, expires FROM sessions").fetchall())
    finally:
        conn.close()


def restart(svc: ServiceEnv, while_down: Callable[[], None] = lambda: None) -> None:
    """kill -9, then a new service on the same address and working directory."""
    address = svc.url.removeprefix("http://")
    svc.kill9()
    while_down()
    svc.start(listen=address)


def test_a_login_outlives_a_kill_and_restart_and_an_expired_one_does_not(svc: ServiceEnv) -> None:
    kept, lapsing = login(svc), login(svc)
    csrf = page_csrf(svc, kept)
    assert csrf and page_csrf(svc, lapsing)
    assert describe_jobs(svc, kept, csrf) == (200, "")
    db = svc.workdir / "service" / "service.db"

    def no_session_id_on_disk() -> None:
        for f in db.parent.iterdir():  # the WAL too: a kill leaves it unmerged
            data = f.read_bytes()
            assert kept.encode() not in data and lapsing.encode() not in data, f"{f.name} holds a session id"

    restart(svc, no_session_id_on_disk)
    assert page_csrf(svc, kept) == csrf  # the same cookie, the same token
    assert describe_jobs(svc, kept, csrf) == (200, "")
    assert describe_jobs(svc, kept, "not-the-token") == (403, "Forbidden.CSRF")
    assert page_csrf(svc, lapsing)

    def twelve_hours_pass_for_one() -> None:
        assert set(rows(db)) == {hashlib.sha256(s.encode()).hexdigest() for s in (kept, lapsing)}
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE sessions SET expires = 1 WHERE id_hash = ?",
                         (hashlib.sha256(lapsing.encode()).hexdigest(),))
        conn.close()

    restart(svc, twelve_hours_pass_for_one)
    assert page_csrf(svc, kept) == csrf
    assert page_csrf(svc, lapsing) is None
    assert describe_jobs(svc, lapsing, csrf)[0] in (400, 403)  # unauthenticated: a signature is asked for
    assert set(rows(db)) == {hashlib.sha256(kept.encode()).hexdigest()}  # the expired row is swept
    assert page_csrf(svc, "made-up-session") is None


def test_sign_out_ends_the_session_and_needs_the_page_token(svc: ServiceEnv) -> None:
    sid = login(svc)
    csrf = page_csrf(svc, sid)
    assert csrf
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = send(svc, "POST", "/logout", b"csrf=forged", form, sid=sid)
    assert (status, json.loads(body)["Code"]) == (403, "Forbidden.CSRF")
    assert page_csrf(svc, sid) == csrf  # a forged sign-out changed nothing

    status, headers, _ = send(svc, "POST", "/logout", urlencode({"csrf": csrf}).encode(), form, sid=sid)
    assert status == 303 and headers["location"] == "/login.html"
    assert "ossimport_session=;" in headers["set-cookie"] and "Max-Age=0" in headers["set-cookie"]
    restart(svc)
    assert page_csrf(svc, sid) is None
    assert describe_jobs(svc, sid, csrf)[0] in (400, 403)
    assert rows(svc.workdir / "service" / "service.db") == {}


def test_changing_the_service_key_pair_signs_every_browser_out(svc: ServiceEnv) -> None:
    sid = login(svc)
    assert page_csrf(svc, sid)
    values = read_properties(svc.sys_path.read_text())
    values["serviceAccessKeySecret"] = "a/New+Secret=02"
    restart(svc, lambda: write_properties(svc.sys_path, values))
    assert page_csrf(svc, sid) is None
    assert page_csrf(svc, login(svc, "a/New+Secret=02"))  # the new pair signs in
