"""What the job console tells and does, end to end: `stat` states and counts, `import` (import.sh)
and `clean` acting on their own job, scan failures, worker settings of sys.properties."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers import write_tree
from jobenv import JobEnv, free_port, write_properties
from test_jobs import local_keys, s3_keys, small_tree

from ossimport.address import parse_address
from ossimport.jobs.store import WorkDir
from ossimport.jobs.tracker import Tracker, job_status


def scanned_env(tmp_path: Path, envs: list[JobEnv], files: dict[str, bytes], job: dict[str, Any] | None = None,
                sys_overrides: dict[str, Any] | None = None) -> JobEnv:
    """A job of `files` (local -> local) submitted and fully scanned into pending tasks, no worker yet."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), **(job or {})}, sys_overrides)
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan")
    return env


def start_worker(env: JobEnv, tmp_path: Path) -> subprocess.Popen[str]:
    """A worker started by hand, as on another host: only --master and its keys (no settings from
    sys.properties)."""
    return subprocess.Popen([sys.executable, "-m", "ossimport", "worker", "--master", f"tcp://127.0.0.1:{env.port}",
                             "--curve-keys", str(env.workdir / "keys"),
                             "--workdir", str(tmp_path / "handmade"), "--heartbeat", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env)


def stop_worker(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.terminate()
    return proc.communicate(timeout=30)


# ---- 14.3: a source that cannot be listed ---------------------------------------------------------
def test_missing_bucket_fails_with_its_cause_and_retry_scans_again(tmp_path: Path, envs: list[JobEnv],
                                                                   backend_factory: Any) -> None:
    s3 = backend_factory("s3-moto")
    keys = s3_keys("src", s3.address(s3.new_root()))
    bucket = f"later-{uuid.uuid4().hex[:8]}"
    env = JobEnv(tmp_path, {**keys, "srcBucket": bucket, **local_keys("dest", tmp_path / "dst")})
    envs.append(env)
    proc = env.console("import", "--interval", "0.5", "--workers", "1", check=False, timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not be listed: NoSuchBucket" in proc.stdout and bucket in proc.stdout
    st = env.stat()
    assert (st["JobState"], st["ETA (s)"]) == ("FAILED", None)
    assert st["Scan Error"].startswith("NoSuchBucket") and bucket in st["Scan Error"]
    assert "Scan Error:NoSuchBucket" in env.console("stat").stdout
    assert "scan failed after 1 attempt: NoSuchBucket" in env.log_tail(), "a missing bucket is not retried"
    assert "could not be listed: NoSuchBucket" in (env.workdir / "logs" / "import.log").read_text()
    assert keys["srcSecretKey"] not in proc.stdout + json.dumps(st)

    loc = parse_address(s3.address("x"))  # fix the cause: a master started again scans again
    client = boto3.client("s3", endpoint_url=f"http://{loc.endpoint}", aws_access_key_id=loc.access_key,
                          aws_secret_access_key=loc.secret_key, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"{keys['srcPrefix']}f{i}", Body=b"x" * i)
    env.console("start", "--workers", "1")
    st = env.wait_state({"SUCCEED"}, timeout=60)  # FAILED (the last word) until the new scan clears it
    assert (st["Files Done"], st["Scan Error"]) == (5, None)


def test_unreachable_source_fails_after_bounded_retries(tmp_path: Path, envs: list[JobEnv]) -> None:
    env = JobEnv(tmp_path, {"srcType": "s3", "srcDomain": f"http://127.0.0.1:{free_port()}", "srcBucket": "b",
                            "srcAccessKey": "ak", "srcSecretKey": "sk-not-shown", **local_keys("dest", tmp_path / "d")})
    envs.append(env)
    proc = env.console("import", "--interval", "0.5", "--workers", "1", "--yes", "--max-retries", "1",
                       check=False, timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("could not be listed: ConnectionRefused") == 2, "the first scan and one retry"
    assert "retry 1: 0 failed tasks back to pending; scanning the source again" in proc.stdout
    assert "sk-not-shown" not in proc.stdout
    st = env.stat()
    assert st["JobState"] == "FAILED" and st["Scan Error"].startswith("ConnectionRefused")
    log = (env.workdir / "logs" / "ossimport2.log").read_text()
    assert log.count("scan failed after 4 attempts: ConnectionRefused") == 2, "as a copy: 4 tries, twice"
    assert "its source will be scanned again" in env.console("retry").stdout
    st = env.stat()
    assert (st["JobState"], st["Scan Error"]) == ("STOPPED", None), "to be scanned when a master runs"


def test_import_ends_when_its_master_dies(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(40, size=(20_000, 30_000))
    env = scanned_env(tmp_path, envs, files, {"taskObjectCountLimit": 5}, {"workerMaxThroughput(KB/s)": 100})
    cmd = [sys.executable, "-m", "ossimport", "console", "--conf-dir", str(env.conf), "import", "--yes",
           "--workers", "1", "--interval", "0.5"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env) as imp:
        try:
            env.wait_for(lambda: env.task_dirs("dispatched"), 60, "a task at work")
            env.kill9(env.pids("master")[0])
            out, err = imp.communicate(timeout=60)
        finally:
            imp.kill()
    assert imp.returncode == 1, out + err
    assert "stopped: its master is not running" in out.strip().splitlines()[-1]


# ---- 14.6: stat tells what is true ----------------------------------------------------------------------
def test_stat_after_kill9_and_during_retry(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(60)
    env = scanned_env(tmp_path, envs, files, {"taskObjectCountLimit": 20})
    gone = sorted(files)[25]
    (tmp_path / "src" / gone).unlink()  # deleted after listing: one file of one task fails
    env.console("start", "--workers", "2")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    assert (st["JobState"], st["Files Done"], st["Files Failed"], st["ETA (s)"]) == ("FAILED", 59, 1, None)
    assert "ETA" not in env.console("stat").stdout, "no ETA for a finished job"

    env.console("stop")
    assert "1 failed tasks moved back to pending" in env.console("retry").stdout
    st = env.stat()
    assert (st["JobState"], st["Pending Task Count"], st["ETA (s)"]) == ("STOPPED", 1, None), "no master runs"
    assert (st["Files Done"], st["Files Total"]) == (59, 60), "the 19 files that succeeded stay done"

    (tmp_path / "src" / gone).write_bytes(files[gone])
    env.console("start", "--workers", "0")
    assert (env.stat()["JobState"], env.stat()["Files Done"]) == ("RUNNING", 59)
    env.kill9(env.pids("master")[0])
    st = env.stat()
    assert (st["JobState"], st["ETA (s)"]) == ("STOPPED", None)
    assert "JobState:STOPPED" in env.console("stat").stdout

    env.console("start", "--workers", "2")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    assert (st["JobState"], st["Files Done"], st["Files Failed"], st["ETA (s)"]) == ("SUCCEED", 60, 0, None)
    [listed] = json.loads(env.console("stat", "--json").stdout)  # one shape, with or without a name
    assert listed == st


def test_incremental_job_waits_between_passes_with_the_next_pass_time(tmp_path: Path,
                                                                       envs: list[JobEnv]) -> None:
    files = small_tree(30)
    env = scanned_env(tmp_path, envs, files, {"isIncremental": True, "incrementalModeInterval": 4,
                                              "taskObjectCountLimit": 10})
    env.console("start", "--workers", "2")
    seen: set[str] = set()
    checkpoint = env.job_dir / "checkpoints" / "scan.json"
    deadline = time.monotonic() + 120
    while json.loads(checkpoint.read_text())["pass"] < 3 and time.monotonic() < deadline:
        st = env.stat()
        seen.add(st["JobState"])
        if st["JobState"] == "WAITING" and st["Next Pass"]:
            break
    assert "SUCCEED" not in seen, "an incremental job never says SUCCEED between passes"
    assert st["JobState"] == "WAITING", st
    finished = max(json.loads((t / "DONE").read_text())["finished"] for t in env.task_dirs("succeed_tasks"))
    next_pass = time.mktime(time.strptime(st["Next Pass"], "%Y-%m-%d %H:%M:%S"))
    assert int(finished) <= next_pass <= finished + 4 + 1, "the next pass starts an interval after the last"
    assert f"Next Pass:{st['Next Pass']}" in env.console("stat").stdout
    env.kill9(env.pids("master")[0])
    st = env.stat()
    assert (st["JobState"], st["Next Pass"]) == ("STOPPED", None)


def test_tracker_reads_only_tasks_that_are_new_or_changed(tmp_path: Path) -> None:
    from ossimport.jobs.store import TaskHeader
    from ossimport.storage.base import Entry

    wd = WorkDir(tmp_path / "run")
    wd.create()
    job = wd.job("cached_job")
    job.create()
    paths = []
    for seq in range(1, 4):
        entries = [Entry(f"s{seq}/f{i}", 10, 0.0) for i in range(4)]
        header = TaskHeader(job.name, f"{seq:032x}_1@h", 1, seq, 4, 40, entries[0].key, entries[-1].key)
        job.add_task(header, entries)
        path = job.dispatch(header.task, "w1")
        ok = seq != 3
        paths.append(job.finish(path, ok, {"files": 4, "bytes": 40, "failed": 0 if ok else 1,
                                           "failed_bytes": 0 if ok else 10}, [], [] if ok else ["s3/f0"]))
    tracker = Tracker(wd)
    [first] = tracker.tick()
    assert (first["Files Done"], first["Files Failed"]) == (11, 1)
    # rewritten in place (as nothing in ossimport does): a cached count does not read it again
    with open(paths[0] / "DONE", "w") as f:
        f.write(json.dumps({"files": 1000, "bytes": 0}))
    [second] = tracker.tick()
    assert second["Files Done"] == 11, "a finished task was read again"
    assert job_status(job)["Files Done"] == 1007, "(uncached, the rewritten file is read)"
    job.retry_failed()  # a change ossimport makes: the retried task is counted afresh
    [third] = tracker.tick()
    assert (third["Files Done"], third["Files Failed"], third["Pending Task Count"]) == (11, 0, 1)


# ---- 14.5 / 9.7: import and clean act on their own job --------------------------------------------------
def test_import_stops_only_what_it_started_for_its_job(tmp_path: Path, envs: list[JobEnv]) -> None:
    incr = small_tree(10)
    env = scanned_env(tmp_path, envs, incr, {"jobName": "forever", "isIncremental": True,
                                             "incrementalModeInterval": 1})
    env.console("stop")
    other_src = tmp_path / "other_src"
    write_tree(other_src, small_tree(12, seed=9))
    write_properties(env.conf / "other.cfg", {"jobName": "other_job", **local_keys("src", other_src),
                                              **local_keys("dest", tmp_path / "other_dst")})
    proc = env.console("import", str(env.conf / "other.cfg"), "--interval", "0.5", "--workers", "2", timeout=120)
    assert "succeeded: 12 files" in proc.stdout
    assert env.pids("master") and len(env.pids("worker")) == 2, "the incremental job still needs them"
    checkpoint = env.job_dir.parent / "forever" / "checkpoints" / "scan.json"
    passes = json.loads(checkpoint.read_text())["pass"]
    env.wait_for(lambda: json.loads(checkpoint.read_text())["pass"] >= passes + 2, 60, "more passes")

    workers = sorted(env.pids("worker"))  # the master is running already: import leaves it and the workers
    proc = env.console("import", str(env.conf / "other.cfg"), "--restart", "--interval", "0.5", timeout=120)
    assert "succeeded: 12 files" in proc.stdout
    assert env.pids("master") and sorted(env.pids("worker")) == workers
    assert env.stat("forever")["JobState"] in ("RUNNING", "WAITING")


def test_clean_cleans_its_own_job_and_every_job_only_with_all(tmp_path: Path, envs: list[JobEnv]) -> None:
    src = tmp_path / "src"
    write_tree(src, small_tree(5))
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", tmp_path / "dst")})
    envs.append(env)
    write_properties(env.conf / "other.cfg", {"jobName": "other_job", **local_keys("src", src),
                                              **local_keys("dest", tmp_path / "o")})
    env.console("submit")
    env.console("submit", str(env.conf / "other.cfg"))
    assert env.console("clean").stdout == "cleaned job test_job\n", "the job of conf/local_job.cfg only"
    assert [s["JobName"] for s in json.loads(env.console("stat", "--json").stdout)] == ["other_job"]
    assert env.console("clean").stdout == "no job named test_job to clean\n"

    primary, secondary = pty.openpty()  # on a terminal, --all asks first
    try:
        os.write(primary, b"n\n")
        proc = subprocess.run([sys.executable, "-m", "ossimport", "console", "--conf-dir", str(env.conf), "clean",
                               "--all"], stdin=secondary, capture_output=True, text=True, env=env.env, timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 1 and "nothing cleaned" in proc.stdout
    assert env.stat("other_job")["JobState"] == "SUBMITTED"
    assert env.console("clean", "--all", input="").stdout == "cleaned job other_job\n"
    assert env.console("stat").stdout.strip() == "no jobs are running or finished"


# ---- 9.7: --yes retries a bounded number of times ----------------------------------------------------
def test_import_yes_gives_up_after_max_retries_naming_the_failed_files(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(30)
    env = scanned_env(tmp_path, envs, files, {"taskObjectCountLimit": 10})
    gone = sorted(files)[3:10]
    for key in gone:
        (tmp_path / "src" / key).unlink()
    proc = env.console("import", "--yes", "--max-retries", "2", "--workers", "1", "--interval", "0.5",
                       check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "retry 2:" in proc.stdout and "retry 3:" not in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"job {env.job_name} still failed after 2 retries (--max-retries 2); giving up"
    verdict = proc.stdout.strip().splitlines()[-2]
    assert f"7 failed files: {', '.join(gone[:5])} and 2 more" in verdict
    assert last in (env.workdir / "logs" / "import.log").read_text()
    bad = env.console("import", "--yes", "--max-retries", "-1", check=False)
    assert bad.returncode == 2 and "--max-retries" in bad.stderr and "Traceback" not in bad.stderr


# ---- 9.7: sys.properties settings that reach the workers ------------------------------------------------
@pytest.mark.parametrize("abort", [True, False], ids=["abort", "go-on"])
def test_worker_abort_when_uncatched_exception(tmp_path: Path, envs: list[JobEnv], abort: bool) -> None:
    env = scanned_env(tmp_path, envs, small_tree(20), {"taskObjectCountLimit": 10},
                      {"workerAbortWhenUncatchedException": abort})
    [bad, _] = env.task_dirs("pending_tasks")
    manifest = (bad / "TASK").read_text().splitlines()
    (bad / "TASK").write_text(manifest[0] + "\n{not json\n")  # a task the worker cannot parse: a "bug"
    worker = start_worker(env, tmp_path)
    try:
        env.wait_for(lambda: env.task_dirs("failed_tasks"), 60, "the task to fail")
        [failed] = env.task_dirs("failed_tasks")
        assert "JSONDecodeError" in (failed / "audit.log").read_text(), "the failure is recorded with its cause"
        if abort:
            assert worker.wait(30) == 1, "the worker exits after reporting the task"
        else:
            st = env.wait_state({"FAILED", "SUCCEED"}, timeout=60)
            assert (st["JobState"], st["Failed Task Count"], st["Succeed Task Count"]) == ("FAILED", 1, 1)
            assert worker.poll() is None, "the worker goes on"
    finally:
        _, err = stop_worker(worker)
    assert ("workerAbortWhenUncatchedException=true" in err) == abort, err


def test_job_throughput_limit_applies_to_any_worker(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = {f"f{i}": os.urandom(200_000) for i in range(6)}
    env = scanned_env(tmp_path, envs, files, {}, {"workerMaxThroughput(KB/s)": 200})
    began = time.monotonic()
    worker = start_worker(env, tmp_path)  # started without --max-throughput
    try:
        st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    finally:
        stop_worker(worker)
    took = time.monotonic() - began
    assert (st["JobState"], st["Bytes Done"]) == ("SUCCEED", 1_200_000)
    # 200 KB/s with a 64 KiB burst: at least (1,200,000 - 65,536) / 204,800 = 5.5 s
    assert took >= 5.0, f"1.2 MB took {took:.1f}s: the limit was not applied"
    assert {p.name: p.read_bytes() for p in (tmp_path / "dst").iterdir()} == files
