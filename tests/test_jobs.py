"""The job system end to end: console, master and workers as real processes over ZeroMQ."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import digests, md5s, write_tree
from jobenv import JobEnv

from ossimport.address import parse_address
from ossimport.jobs.store import decode_manifest


def small_tree(n: int, seed: int = 3, size: tuple[int, int] = (0, 2000)) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {f"d{i % 37:02d}/s{i % 5}/f{i:05d}.bin": rnd.randbytes(rnd.randint(*size)) for i in range(n)}


def s3_keys(side: str, address: str) -> dict[str, Any]:
    """job.cfg keys for one side, from a test backend's address."""
    loc = parse_address(address)
    return {f"{side}Type": "s3", f"{side}Domain": f"http://{loc.endpoint}", f"{side}Bucket": loc.bucket,
            f"{side}Prefix": loc.prefix, f"{side}AccessKey": loc.access_key, f"{side}SecretKey": loc.secret_key}


def run_upstream_template(tmp_path: Path, envs: list[JobEnv], backend_factory: Any, template: str,
                          src_keys: dict[str, Any], files: dict[str, bytes], dest: str) -> None:
    """An upstream job.cfg template, unchanged but for its source's endpoint keys (`src_keys`) and
    its destination: "local" (a directory) or an S3 test backend. `files` are the source's files
    under the template's srcPrefix (docs/); they must arrive byte for byte, and nothing else."""
    if dest == "local":
        out = tmp_path / "out"
        dest_keys: dict[str, Any] = {"destType": "local", "destPrefix": f"{out}/"}
    else:
        s3 = backend_factory(dest)
        s3_root = s3.new_root()
        dest_keys = s3_keys("dest", s3.address(s3_root))
    env = JobEnv(tmp_path, job={"jobName": "local_test"})
    envs.append(env)
    env.run_template(template, {**src_keys, **dest_keys}, len(files))
    want = md5s({k.removeprefix("docs/"): v for k, v in files.items()})
    if dest == "local":
        assert md5s({str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}) == want
    else:
        assert digests(s3.storage(s3_root)) == want


def local_keys(side: str, path: Path) -> dict[str, Any]:
    return {f"{side}Type": "local", f"{side}Prefix": f"{path}/"}


def assert_counted_once(env: JobEnv, n_files: int) -> None:
    keys = env.audit_keys()
    dupes = [k for k, c in Counter(keys).items() if c > 1]
    assert not dupes, f"counted twice: {dupes[:5]}"
    assert len(keys) == n_files


def test_stat_before_any_job(tmp_path: Path, envs: list[JobEnv]) -> None:
    env = JobEnv(tmp_path, {**local_keys("src", tmp_path), **local_keys("dest", tmp_path / "out")})
    envs.append(env)
    assert env.console("stat").stdout.strip() == "no jobs are running or finished"


def test_5000_files_local_to_s3_and_back(tmp_path: Path, envs: list[JobEnv], backend_factory) -> None:  # type: ignore[no-untyped-def]
    s3 = backend_factory("s3-ceph")
    files = small_tree(5000)
    src = tmp_path / "src"
    write_tree(src, files)
    root = s3.new_root()
    s3_addr = s3.address(root)

    up = JobEnv(tmp_path / "up", {"jobName": "upload", **local_keys("src", src), **s3_keys("dest", s3_addr),
                                  "taskObjectCountLimit": 700})
    envs.append(up)
    up.console("submit")
    up.console("start", "--workers", "2")
    st = up.wait_state({"SUCCEED", "FAILED"}, timeout=240)
    assert st["JobState"] == "SUCCEED", up.log_tail()
    assert (st["Succeed Task Count"], st["Failed Task Count"], st["Pending Task Count"]) == (8, 0, 0)
    assert (st["Files Total"], st["Files Done"], st["Files Failed"]) == (5000, 5000, 0)
    assert st["Bytes Done"] == sum(map(len, files.values()))
    assert digests(s3.storage(root)) == md5s(files)
    assert_counted_once(up, 5000)
    for task in up.task_dirs("succeed_tasks"):
        assert sorted(p.name for p in task.iterdir()) == ["DONE", "STATUS", "TASK", "audit.log", "error.list"]
        assert (task / "STATUS").read_text() == "Completed\n"
    assert oct((up.job_dir / "job.cfg").stat().st_mode & 0o777) == "0o600"
    assert len({json.loads((t / "DONE").read_text())["worker"] for t in up.task_dirs("succeed_tasks")}) == 2
    up.stop()

    back = tmp_path / "back"
    down = JobEnv(tmp_path / "down", {"jobName": "download", **s3_keys("src", s3_addr), **local_keys("dest", back),
                                      "taskObjectCountLimit": 500, "scanThreadCount": 4})
    envs.append(down)
    down.console("submit")
    down.console("start", "--workers", "4")
    st = down.wait_state({"SUCCEED", "FAILED"}, timeout=240)
    assert st["JobState"] == "SUCCEED", down.log_tail()
    ranges = json.loads((down.job_dir / "checkpoints" / "scan.json").read_text())["ranges"]
    assert len(ranges) == 38, "the bucket was scanned in parallel ranges, one per directory and one before"
    assert (st["Files Done"], st["Files Failed"], st["Failed Task Count"]) == (5000, 0, 0)
    got = {str(p.relative_to(back)): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    assert got == files
    assert_counted_once(down, 5000)


def test_worker_killed_mid_task(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(400, size=(20_000, 60_000))
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "taskObjectCountLimit": 40},
                 {"workerMaxThroughput(KB/s)": 1500})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "2")
    kills = 0
    for _ in range(3):
        env.wait_for(lambda: env.task_dirs("dispatched") and env.stat()["JobState"] == "RUNNING", 60,
                     "a dispatched task")
        victim = env.stat()
        if victim["JobState"] != "RUNNING":
            break
        pids = env.pids("worker")
        env.kill9(random.choice(pids))
        kills += 1
        env.console("start", "--workers", "2")  # replaces the dead worker
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=180)
    assert kills >= 1
    assert st["JobState"] == "SUCCEED", env.log_tail()
    assert (st["Succeed Task Count"], st["Files Done"], st["Files Failed"]) == (10, 400, 0)
    got = {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == files, "nothing missing, no temp file left"
    assert_counted_once(env, 400)


def test_master_killed_during_scan_and_during_dispatch(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = {f"p{i % 50:02d}/f{i:05d}": b"" for i in range(3000)}
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "taskObjectCountLimit": 10})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    checkpoint = env.job_dir / "checkpoints" / "scan.json"
    range0 = env.job_dir / "checkpoints" / "range-p1-0.json"

    def scanning() -> bool:
        try:
            return json.loads(range0.read_text())["seq"] >= 20
        except (FileNotFoundError, ValueError):
            return False

    env.wait_for(scanning, 60, "the scan to cut 20 tasks")
    env.kill9(env.pids("master")[0])
    assert not json.loads(checkpoint.read_text())["done"], "the master was killed mid-scan"
    env.console("start", "--workers", "0")
    env.wait_for(lambda: json.loads(checkpoint.read_text()).get("done"), 60, "the scan to finish")
    manifests = [decode_manifest((t / "TASK").read_text())[1] for t in env.task_dirs("pending_tasks")]
    keys = [e.key for m in manifests for e in m]
    assert len(manifests) == 300 and sorted(keys) == sorted(files), "no task lost or cut twice"

    env.console("start", "--workers", "2")
    env.wait_for(lambda: len(env.task_dirs("succeed_tasks")) >= 40, 120, "40 tasks done")
    env.kill9(env.pids("master")[0])
    assert env.task_dirs("pending_tasks"), "the master was killed mid-dispatch"
    env.console("start", "--workers", "2")  # master again; the workers reconnect by themselves
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=180)
    assert st["JobState"] == "SUCCEED", env.log_tail()
    assert (st["Succeed Task Count"], st["Files Done"]) == (300, 3000)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == sorted(files)
    assert_counted_once(env, 3000)


def test_failed_files_land_in_failed_tasks_and_retry_completes(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(60)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "taskObjectCountLimit": 20})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    env.wait_for(lambda: env.stat()["Is Scan Finished"], 60, "the scan")
    gone = sorted(files)[25]
    (src / gone).unlink()  # deleted after listing
    env.console("start", "--workers", "2")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    assert (st["JobState"], st["Failed Task Count"], st["Files Failed"]) == ("FAILED", 1, 1)
    [failed] = env.task_dirs("failed_tasks")
    assert (failed / "error.list").read_text().splitlines() == [gone]
    assert f"FAILED\t{gone}\tSOURCE_DELETED" in (failed / "audit.log").read_text()
    assert (failed / "STATUS").read_text() == "Failed\n"

    (src / gone).write_bytes(files[gone])  # fix the cause, then retry exactly what failed
    assert "1 failed tasks moved back to pending" in env.console("retry").stdout
    st = env.wait_state({"SUCCEED"}, timeout=120)
    assert (st["Failed Task Count"], st["Files Done"], st["Files Failed"]) == (0, 60, 0)
    retried = [t for t in env.task_dirs("succeed_tasks") if (t / "audit.log").read_text().count("\n") == 1]
    assert len(retried) == 1, "the retried task holds only the file that failed"
    assert (dst / gone).read_bytes() == files[gone]


def test_invalid_names_fail_with_cause(tmp_path: Path, envs: list[JobEnv], backend_factory) -> None:  # type: ignore[no-untyped-def]
    import boto3

    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    loc = s3.storage(root).location
    client = boto3.client("s3", endpoint_url=loc.endpoint_url(), aws_access_key_id="a", aws_secret_access_key="b",
                          region_name="us-east-1")
    for key in ("good.txt", "../escape.txt"):
        client.put_object(Bucket=loc.bucket, Key=loc.prefix + key, Body=b"data")
    dst = tmp_path / "inner" / "dst"
    env = JobEnv(tmp_path, {**s3_keys("src", s3.address(root)), **local_keys("dest", dst)})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "1")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    assert (st["JobState"], st["Files Done"], st["Files Failed"]) == ("FAILED", 1, 1)
    [failed] = env.task_dirs("failed_tasks")
    assert "InvalidObjectName" in (failed / "audit.log").read_text()
    assert (dst / "good.txt").read_bytes() == b"data"
    assert not (tmp_path / "inner" / "escape.txt").exists()


def test_incremental_copies_only_what_changed(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(50)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "isIncremental": True,
                            "incrementalModeInterval": 2, "taskObjectCountLimit": 20})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "2")
    env.wait_state({"WAITING"}, timeout=120)
    assert env.stat()["Files Done"] == 50
    changed = sorted(files)[7]
    (src / changed).write_bytes(b"changed content of another size")
    (src / "new/file.txt").parent.mkdir(parents=True, exist_ok=True)
    (src / "new/file.txt").write_bytes(b"new")
    checkpoint = env.job_dir / "checkpoints" / "scan.json"
    env.wait_for(lambda: json.loads(checkpoint.read_text())["pass"] >= 3, 120, "the second pass to finish")
    second = [decode_manifest((t / "TASK").read_text()) for t in env.task_dirs("succeed_tasks")]
    pass2 = sorted(e.key for h, entries in second if h.pass_no == 2 for e in entries)
    assert pass2 == sorted([changed, "new/file.txt"])
    assert (dst / changed).read_bytes() == b"changed content of another size"
    assert (dst / "new/file.txt").read_bytes() == b"new"


def test_audit_job_reports_differences_without_copying(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(30, size=(10, 100))
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    keys = sorted(files)
    altered = dict(files)
    del altered[keys[0]]  # missing at the destination
    altered[keys[1]] = files[keys[1]] + b"!"  # size differs
    altered[keys[2]] = bytes(len(files[keys[2]]))  # same size, other content
    write_tree(dst, altered)
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "jobType": "audit",
                            "auditMode": "detailed"})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "1")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=120)
    assert st["JobState"] == "FAILED"
    [failed] = env.task_dirs("failed_tasks")
    assert sorted((failed / "error.list").read_text().splitlines()) == keys[:3]
    audit = (failed / "audit.log").read_text()
    for code in ("MISSING_AT_DESTINATION", "SIZE_NOT_MATCH", "CHECKSUM_NOT_MATCH"):
        assert code in audit
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before, "an audit copies nothing"


def test_console_refuses_bad_input_in_one_line(tmp_path: Path, envs: list[JobEnv]) -> None:
    env = JobEnv(tmp_path, {**local_keys("src", tmp_path), **local_keys("dest", tmp_path / "o"), "jobType": "copy"})
    envs.append(env)
    proc = env.console("submit", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "jobType" in proc.stderr and "Traceback" not in proc.stderr
    env2 = JobEnv(tmp_path / "b", {**local_keys("src", tmp_path), **local_keys("dest", tmp_path / "o")})
    envs.append(env2)
    env2.console("submit")
    again = env2.console("submit", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_one_click_import(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = small_tree(40)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst)})
    envs.append(env)
    proc = env.console("import", "--interval", "0.5", "--workers", "2", timeout=120)
    assert "succeeded: 40 files" in proc.stdout
    assert not env.pids("master") and not env.pids("worker"), "import stops what it started"
    proc = env.console("import", "--interval", "0.5", "--workers", "1", timeout=120, input="")
    assert "resume from breakpoint (y) or start over (n)?" in proc.stdout
    proc = env.console("import", "--restart", "--interval", "0.5", "--workers", "1", timeout=120)
    assert "submitted job" in proc.stdout and "succeeded: 40 files" in proc.stdout
    assert {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == files


def test_secrets_stay_in_the_0600_config(tmp_path: Path, envs: list[JobEnv], backend_factory) -> None:  # type: ignore[no-untyped-def]
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    src = tmp_path / "src"
    write_tree(src, small_tree(20))
    keys = s3_keys("dest", s3.address(root))
    env = JobEnv(tmp_path, {**local_keys("src", src), **keys})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "1")
    env.wait_state({"SUCCEED"}, timeout=120)
    secret = keys["destSecretKey"]
    outputs = env.console("stat").stdout + env.console("stat", "--json").stdout
    assert secret not in outputs
    for path in env.workdir.rglob("*"):
        if path.is_file() and path.name != "job.cfg":
            assert secret not in path.read_text(errors="replace"), path
    for cfg in env.workdir.rglob("job.cfg"):
        assert oct(cfg.stat().st_mode & 0o777) == "0o600"


def test_parallel_scan_covers_every_key_once_across_a_crash(tmp_path: Path, envs: list[JobEnv]) -> None:
    files = {f"top{i}.txt": b"" for i in range(7)}  # files beside the directories belong to a range too
    files.update({f"d{i % 9}/s{i % 4}/f{i:05d}": b"" for i in range(1200)})
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **local_keys("dest", dst), "taskObjectCountLimit": 10,
                            "scanThreadCount": 4, "maxMultiThreadScanDepth": 2})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "0")
    checkpoint = env.job_dir / "checkpoints" / "scan.json"
    env.wait_for(lambda: len(env.task_dirs("pending_tasks")) >= 30, 60, "30 tasks cut")
    env.kill9(env.pids("master")[0])
    cp = json.loads(checkpoint.read_text())
    assert not cp["done"], "the master was killed mid-scan"
    assert len(cp["ranges"]) == 1 + 9 + 9 * 4, "ranges cut at the directories of two levels"
    env.console("start", "--workers", "0")
    env.wait_for(lambda: json.loads(checkpoint.read_text()).get("done"), 60, "the scan to finish")
    keys = [e.key for t in env.task_dirs("pending_tasks") for e in decode_manifest((t / "TASK").read_text())[1]]
    assert sorted(keys) == sorted(files), "every key in exactly one task"
    env.console("start", "--workers", "2")
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=180)
    assert (st["JobState"], st["Files Total"], st["Files Done"]) == ("SUCCEED", len(files), len(files))
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == sorted(files)
