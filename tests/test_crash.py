"""Crash-only: kill -9 of workers and of the master at random moments; nothing lost or doubled.

Every test ends with the verify command (`--checksum`) finding zero differences, each file
counted exactly once in the job's audit logs, and no unfinished multipart upload left behind.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from helpers import run_json, write_tree
from jobenv import JobEnv
from test_jobs import local_keys, s3_keys, small_tree

MiB = 1024 * 1024


def workload(seed: int) -> dict[str, bytes]:
    files = small_tree(3000, seed=seed, size=(100, 4000))
    rnd = random.Random(seed)
    for i in range(3):  # multipart-sized: a kill mid-upload leaves parts that must be aborted
        files[f"large/part-{i}.bin"] = rnd.randbytes(11 * MiB + i)
    return files


def finish_and_check(env: JobEnv, src: Path, s3, root: str, n_files: int) -> None:  # type: ignore[no-untyped-def]
    st = env.wait_state({"SUCCEED", "FAILED"}, timeout=300)
    assert st["JobState"] == "SUCCEED", env.log_tail()
    assert (st["Files Done"], st["Files Failed"], st["Pending Task Count"], st["Dispatched Task Count"]) == (
        n_files, 0, 0, 0)
    keys = env.audit_keys()
    assert not [k for k, c in Counter(keys).items() if c > 1], "a file was counted twice"
    assert len(keys) == n_files
    out = run_json("--checksum", "verify", f"{src}/", s3.address(root))
    assert (out["identical"], out["missing"], out["differ"], out["extra"]) == (n_files, 0, 0, 0)
    assert list(s3.storage(root).list_multipart()) == [], "orphan multipart uploads remain"


def test_worker_killed_ten_times_at_random_moments(tmp_path: Path, envs: list[JobEnv], backend_factory) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(20261121)
    s3 = backend_factory("s3-ceph")
    root = s3.new_root()
    files = workload(1)
    src = tmp_path / "src"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **s3_keys("dest", s3.address(root)),
                            "taskObjectCountLimit": 150, "multipartUploadThreshold": "5m",
                            "multipartUploadPartSize": "5m", "auditMode": "detailed"},
                 {"workerMaxThroughput(KB/s)": 1500, "leaseSeconds": 5})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "2")
    kills = 0
    while kills < 10:
        time.sleep(rnd.uniform(0.2, 1.5))  # a random moment, not a wait for something
        assert env.stat()["JobState"] == "RUNNING", f"the job ended after {kills} kills: make it longer"
        pids = env.pids("worker")
        if pids:
            env.kill9(rnd.choice(pids))
            kills += 1
        env.console("start", "--workers", "2")  # a replacement joins, as an operator would
    finish_and_check(env, src, s3, root, len(files))


def test_master_killed_while_tasks_complete(tmp_path: Path, envs: list[JobEnv], backend_factory) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(7)
    s3 = backend_factory("s3-ceph")
    root = s3.new_root()
    files = small_tree(3000, seed=2, size=(100, 3000))
    src = tmp_path / "src"
    write_tree(src, files)
    env = JobEnv(tmp_path, {**local_keys("src", src), **s3_keys("dest", s3.address(root)),
                            "taskObjectCountLimit": 60},
                 {"workerMaxThroughput(KB/s)": 800})
    envs.append(env)
    env.console("submit")
    env.console("start", "--workers", "2")
    for _ in range(4):
        done = len(env.task_dirs("succeed_tasks"))
        env.wait_for(lambda done=done: len(env.task_dirs("succeed_tasks")) > done, 120, "a task to complete")
        time.sleep(rnd.uniform(0.0, 0.5))  # a random moment among completions
        assert env.stat()["JobState"] == "RUNNING"
        env.kill9(env.pids("master")[0])
        env.console("start", "--workers", "2")
    finish_and_check(env, src, s3, root, len(files))
