"""The service's JSON door and its Jobs actions, over real HTTP against `ossimport serve` with the
job system's real master and worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import tree, write_tree
from jobenv import write_properties
from serviceenv import ServiceEnv


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ServiceEnv]:
    env = ServiceEnv(tmp_path)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def local_job(tmp: Path, name: str, files: dict[str, bytes] | None = None) -> dict[str, Any]:
    src = tmp / f"{name}-src"
    write_tree(src, files if files is not None else tree())
    return {"jobName": name, "srcType": "local", "srcPrefix": f"{src}/", "destType": "local",
            "destPrefix": f"{tmp}/{name}-dst/"}


def test_create_job_runs_to_the_end_and_is_described(svc: ServiceEnv, tmp_path: Path) -> None:
    files = tree()
    body = svc.ok("CreateJob", **local_job(tmp_path, "job_one", files))
    assert body["JobName"] == "job_one" and body["RequestId"]
    job = svc.wait_job("job_one", {"SUCCEED", "FAILED"})
    assert job["State"] == "SUCCEED"
    assert (job["FilesTotal"], job["FilesDone"], job["FilesFailed"]) == (len(files), len(files), 0)
    assert job["BytesDone"] == sum(map(len, files.values())) and job["Progress"] == 10000
    assert job["Source"] == f"{tmp_path}/job_one-src/" and job["Destination"] == f"{tmp_path}/job_one-dst/"
    for key, data in files.items():
        assert (tmp_path / "job_one-dst" / key).read_bytes() == data
    listed = svc.ok("DescribeJobs")["Jobs"]["Job"]
    assert [j["JobName"] for j in listed] == ["job_one"] and listed[0]["State"] == "SUCCEED"


def test_create_job_refuses_what_console_submit_refuses_with_the_same_message(svc: ServiceEnv,
                                                                             tmp_path: Path) -> None:
    bad = [
        {"jobName": "ab", "srcType": "local", "srcPrefix": "/", "destType": "local", "destPrefix": "/tmp/x/"},
        {"jobName": "bad_type", "srcType": "dropbox", "destType": "local", "destPrefix": "/tmp/x/"},
        {"jobName": "no_bucket", "srcType": "local", "srcPrefix": f"{tmp_path}/", "destType": "oss",
         "destDomain": "oss-cn-hangzhou.aliyuncs.com"},
        {"jobName": "no_src_dir", "srcType": "local", "srcPrefix": f"{tmp_path}/missing/", "destType": "local",
         "destPrefix": f"{tmp_path}/d/"},
    ]
    for i, cfg in enumerate(bad):
        status, body = svc.call("CreateJob", **cfg)
        assert status == 400 and body["Code"] == "InvalidParameter", body
        path = tmp_path / f"bad{i}.cfg"
        write_properties(path, cfg)
        proc = subprocess.run([sys.executable, "-m", "ossimport", "console", "--sys", str(svc.sys_path), "submit",
                               str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        console_message = proc.stderr.strip().splitlines()[-1].split(f"{path}: ", 1)[1]
        assert body["Message"] == f"CreateJob: {console_message}"
    assert svc.ok("DescribeJobs")["Jobs"]["Job"] == []


def test_create_job_twice_conflicts_unless_the_client_token_repeats(svc: ServiceEnv, tmp_path: Path) -> None:
    cfg = local_job(tmp_path, "job_token")
    first = svc.ok("CreateJob", ClientToken="tok-1", **cfg)
    again = svc.ok("CreateJob", ClientToken="tok-1", **cfg)  # a retried request: the same answer
    assert again["JobName"] == first["JobName"] and again["RequestId"] != first["RequestId"]
    status, body = svc.call("CreateJob", ClientToken="tok-1", **{**cfg, "destPrefix": f"{tmp_path}/other/"})
    assert (status, body["Code"]) == (400, "IdempotentParameterMismatch")
    status, body = svc.call("CreateJob", **cfg)
    assert (status, body["Code"]) == (409, "Job.AlreadyExists")
    # a kill after the submit, before the token's answer was recorded: the retry still succeeds
    import sqlite3

    with sqlite3.connect(svc.workdir / "service" / "service.db") as db:
        assert db.execute("DELETE FROM tokens WHERE token = 'tok-1'").rowcount == 1
    assert svc.ok("CreateJob", ClientToken="tok-1", **cfg)["JobName"] == "job_token"
    status, body = svc.call("CreateJob", ClientToken="tok-2", **{**cfg, "destPrefix": f"{tmp_path}/other/"})
    assert (status, body["Code"]) == (409, "Job.AlreadyExists"), "another config under the name is refused"
    assert "console.sh clean job_token" in body["Message"]


def test_dry_run_validates_only(svc: ServiceEnv, tmp_path: Path) -> None:
    assert svc.ok("CreateJob", DryRun=True, **local_job(tmp_path, "job_dry"))["JobName"] == "job_dry"
    assert svc.ok("DescribeJobs")["Jobs"]["Job"] == []
    status, body = svc.call("CreateJob", DryRun=True, **{**local_job(tmp_path, "job_dry"), "srcType": ""})
    assert (status, body["Code"]) == (400, "InvalidParameter") and "srcType is missing" in body["Message"]


def test_describe_jobs_pages(svc: ServiceEnv, tmp_path: Path) -> None:
    for name in ("job_a", "job_b", "job_c"):
        svc.ok("CreateJob", **local_job(tmp_path, name, {"f.txt": b"x"}))
    seen = []
    token = ""
    for _ in range(5):
        body = svc.ok("DescribeJobs", MaxResults=2, NextToken=token)
        seen += [j["JobName"] for j in body["Jobs"]["Job"]]
        token = body["NextToken"]
        if not token:
            break
    assert seen == ["job_a", "job_b", "job_c"]
    status, body = svc.call("DescribeJobs", MaxResults=101)
    assert (status, body["Code"]) == (400, "InvalidParameter") and "MaxResults" in body["Message"]


def test_failed_files_are_listed_with_causes_and_retry_copies_them(svc: ServiceEnv, tmp_path: Path) -> None:
    files = {"ok.txt": b"fine", "blocked/inner.txt": b"needs a directory"}
    cfg = local_job(tmp_path, "job_retry", files)
    dst = tmp_path / "job_retry-dst"
    dst.mkdir()
    (dst / "blocked").write_bytes(b"a file where the source has a directory")
    svc.ok("CreateJob", **cfg)
    job = svc.wait_job("job_retry", {"SUCCEED", "FAILED"})
    assert job["State"] == "FAILED" and job["FilesFailed"] == 1
    failed = job["FailedFiles"]["FailedFile"]
    assert [f["Key"] for f in failed] == ["blocked/inner.txt"] and failed[0]["Cause"]
    (dst / "blocked").unlink()
    assert svc.ok("RetryJob", JobName="job_retry")["RetriedTasks"] == 1
    job = svc.wait_job("job_retry", {"SUCCEED"})
    assert job["FilesDone"] == 2 and job["FailedFiles"]["FailedFile"] == []
    assert (dst / "blocked" / "inner.txt").read_bytes() == b"needs a directory"


def test_delete_job_cleans_it(svc: ServiceEnv, tmp_path: Path) -> None:
    svc.ok("CreateJob", **local_job(tmp_path, "job_del", {"f": b"1"}))
    svc.wait_job("job_del", {"SUCCEED"})
    svc.ok("DeleteJob", JobName="job_del")
    assert not (svc.workdir / "master" / "jobs" / "job_del").exists()
    status, body = svc.call("DescribeJob", JobName="job_del")
    assert (status, body["Code"]) == (404, "InvalidJob.NotFound")


def test_error_envelope(svc: ServiceEnv) -> None:
    status, body = svc.call("NoSuchAction")
    assert status == 404 and body["Code"] == "InvalidAction.NotFound"
    assert set(body) == {"RequestId", "HostId", "Code", "Message"}
    status, body = svc.call("DescribeJob")
    assert (status, body["Code"]) == (400, "MissingJobName")
    status, raw, _ = svc.request("POST", "/api/DescribeJobs", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and b'"InvalidParameter"' in raw
    status, body = svc.call("DescribeJobs", MaxResults="many")
    assert status == 400 and "MaxResults" in body["Message"]


def test_stop_job_stops_the_workers_and_retry_starts_them(svc: ServiceEnv, tmp_path: Path) -> None:
    svc.ok("CreateJob", **local_job(tmp_path, "job_stop", {"f": b"1"}))
    svc.wait_job("job_stop", {"SUCCEED"})
    pids = list((svc.workdir / "run").glob("*.pid"))
    assert pids, "serve started the master and a worker"
    svc.ok("StopJob", JobName="job_stop")
    assert not list((svc.workdir / "run").glob("*.pid"))
    svc.ok("RetryJob", JobName="job_stop")
    assert (svc.workdir / "run" / "master.pid").exists()


def test_non_loopback_bind_without_credentials_is_refused(tmp_path: Path) -> None:
    env = ServiceEnv(tmp_path, workers=False)
    proc = subprocess.run([sys.executable, "-m", "ossimport", "serve", "--sys", str(env.sys_path),
                           "--listen", "0.0.0.0:0", "--no-workers"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "serviceAccessKeyId" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ossimport", "serve", "--sys", str(env.sys_path),
                           "--listen", "nonsense"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "use HOST:PORT" in proc.stderr


def test_openapi_and_metrics(svc: ServiceEnv, tmp_path: Path) -> None:
    import json

    status, raw, _ = svc.request("GET", "/openapi.json")
    doc = json.loads(raw)
    assert status == 200 and "/api/CreateJob" in doc["paths"] and "/api/DescribeJobs" in doc["paths"]
    svc.ok("CreateJob", **local_job(tmp_path, "job_metrics", {"a": b"12345"}))
    svc.wait_job("job_metrics", {"SUCCEED"})
    status, raw, headers = svc.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'ossimport_job_bytes_total{job="job_metrics",outcome="copied"} 5.0' in text
    assert 'ossimport_job_files_total{job="job_metrics",outcome="copied"} 1.0' in text
    assert "ossimport_request_duration_seconds_bucket" in text


def test_events_stream_job_progress_to_the_end(svc: ServiceEnv, tmp_path: Path) -> None:
    import http.client
    import json
    import time

    host, port = svc.url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/api/events")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.readline() == b": connected\n"
    files = {"a.txt": b"1" * 1000, "b/c.txt": b"2" * 500}
    svc.ok("CreateJob", **local_job(tmp_path, "job_events", files))
    events: list[dict] = []
    kind = ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = resp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind == "job":
            events.append(json.loads(line[6:]))
            if events[-1].get("State") == "SUCCEED":
                break
    conn.close()
    assert events and events[0]["State"] == "SUBMITTED"
    last = events[-1]
    assert last["State"] == "SUCCEED" and last["Progress"] == 10000 and last["BytesDone"] == 1500


def test_console_start_starts_the_service_and_stop_stops_it(tmp_path: Path) -> None:
    import json
    import urllib.request

    from jobenv import free_port

    port = free_port()
    env = ServiceEnv(tmp_path, {"serviceAddress": f"127.0.0.1:{port}"})
    console = [sys.executable, "-m", "ossimport", "console", "--sys", str(env.sys_path)]
    try:
        proc = subprocess.run([*console, "start"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"service and web UI on http://127.0.0.1:{port}/" in proc.stdout
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/DescribeJobs", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["Jobs"]["Job"] == []
        again = subprocess.run([*console, "start"], capture_output=True, text=True, timeout=120)
        assert "master is already running" in again.stdout and "service and web UI" in again.stdout
    finally:
        subprocess.run([*console, "stop"], capture_output=True, text=True, timeout=120)
    assert not (env.workdir / "run" / "service.pid").exists()
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_requests_a_foreign_web_page_could_make_are_refused(svc: ServiceEnv, tmp_path: Path) -> None:
    """Without credentials on 127.0.0.1, a page on another site must not reach the service through
    the user's browser: simple cross-site posts, rebound host names, URLs with Action=."""
    body = json.dumps(local_job(tmp_path, "job_csrf", {"f": b"1"})).encode()
    port = svc.url.rsplit(":", 1)[1]
    refused = [
        ({"Content-Type": "text/plain"}, 400, "InvalidParameter"),  # a form/fetch without preflight
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, "Forbidden.CSRF"),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403, "Forbidden.CSRF"),
        ({"Content-Type": "application/json", "Host": f"evil.example:{port}"}, 403, "Forbidden.Host"),
    ]
    for headers, status, code in refused:
        got, raw, _ = svc.request("POST", "/api/CreateJob", body, headers)
        assert (got, json.loads(raw)["Code"]) == (status, code), headers
    got, raw, _ = svc.request("GET", "/?Action=DeleteJob&JobName=job_csrf")
    assert (got, json.loads(raw)["Code"]) == (403, "Forbidden.CSRF")
    assert svc.ok("DescribeJobs")["Jobs"]["Job"] == [], "nothing was created"
    same = {"Content-Type": "application/json", "Origin": f"http://localhost:{port}", "Sec-Fetch-Site": "same-origin",
            "Host": f"localhost:{port}"}
    got, raw, _ = svc.request("POST", "/api/CreateJob", body, same)
    assert got == 200, raw
    got, raw, _ = svc.request("GET", "/?JobName=job_csrf", headers={"x-acs-action": "DescribeJob"})
    assert got == 200 and json.loads(raw)["Job"]["JobName"] == "job_csrf"


def test_a_second_service_on_the_same_working_directory_is_refused(svc: ServiceEnv) -> None:
    proc = subprocess.run([sys.executable, "-m", "ossimport", "serve", "--sys", str(svc.sys_path), "--listen",
                           "127.0.0.1:0", "--no-workers"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "another service" in proc.stderr and str(svc.proc.pid if svc.proc else "") in proc.stderr
    assert svc.ok("DescribeJobs")["Jobs"]["Job"] == []  # the first one still serves


def test_listens_on_ipv6_loopback(tmp_path: Path) -> None:
    env = ServiceEnv(tmp_path, workers=False)
    try:
        env.start(listen="[::1]:0")
        assert env.url.startswith("http://[::1]:")
        assert env.ok("DescribeJobs")["Jobs"]["Job"] == []
    finally:
        env.stop()
