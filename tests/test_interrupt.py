"""Ctrl-C (SIGINT to a real `ossimport` process) stops a run at once, whatever the backlog or the
bandwidth limit: exit 130, only the copies already in flight may still finish, no temp file left.
A run killed outright (a second Ctrl-C, kill -9) leaves temp files: the next run removes them."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from helpers import run_json, write_tree
from servers.faultproxy import Fault, FaultProxy

from ossimport.storage.local import is_temp_name

MiB = 1024 * 1024
THREADS = 4


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ossimport", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def files_at(root: Path) -> tuple[set[str], set[str]]:
    """(published files, our temp files) under root."""
    done, temps = set(), set()
    for p in root.rglob("*"):
        if p.is_file():
            (temps if is_temp_name(p.name) else done).add(p.relative_to(root).as_posix())
    return done, temps


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def backlog(root: Path) -> dict[str, bytes]:
    """One large file (a pre-sized temp file, written in ranges) and many small ones."""
    rnd = random.Random(5)
    files = {"a/large.bin": rnd.randbytes(6 * MiB)}
    files.update({f"d{i % 10}/f{i:04d}.bin": rnd.randbytes(16 * 1024) for i in range(600)})
    write_tree(root, files)
    return files


def test_ctrl_c_under_a_bandwidth_limit_returns_at_once(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = backlog(src)
    # 2 Mbit/s: the whole tree would take ~40 s; the large file alone ~25 s
    proc = start("--json", "--bwlimit", "2", "--threads", str(THREADS), "--multipart-threshold", "1m",
                 "--part-size", "1m", "cp", f"{src}/", f"{dst}/")
    try:
        wait_for("a few copies", lambda: len(files_at(dst)[0]) >= 3 and bool(files_at(dst)[1]))
        copied_before = files_at(dst)[0]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)  # a generous deadline; the run returns within ~1 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    copied_after, temps = files_at(dst)
    # only copies already in flight may have finished (each thread holds one)
    assert len(copied_after - copied_before) <= THREADS, sorted(copied_after - copied_before)
    assert "a/large.bin" not in copied_after
    assert temps == set(), "an abandoned copy left its temp file"
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert summary["copied"] == len(copied_after) and summary["failed"] == 0
    assert len(copied_after) < len(files)


def test_the_next_run_removes_temp_files_of_killed_runs(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = backlog(src)
    proc = start("--bwlimit", "2", "--threads", str(THREADS), "--multipart-threshold", "1m", "--part-size", "1m",
                 "cp", f"{src}/", f"{dst}/")
    try:
        wait_for("the large file's temp file", lambda: any(t.startswith("a/") for t in files_at(dst)[1]))
    finally:
        proc.kill()  # as a second Ctrl-C or a crash would: nothing cleans up
        proc.communicate()
    left = files_at(dst)[1]
    assert left, "the killed run left no temp file: nothing to test"
    # a temp file written after the next run starts (a concurrent run's) is not touched
    newer = dst / "d0" / ".f0000.bin.ossimport.0123456789abcdef.tmp"
    newer.parent.mkdir(parents=True, exist_ok=True)
    newer.write_bytes(b"still being written")
    future = time.time() + 3600
    os.utime(newer, (future, future))
    out = run_json("sync", f"{src}/", f"{dst}/")
    assert out["failed"] == 0
    done, temps = files_at(dst)
    assert temps == {"d0/.f0000.bin.ossimport.0123456789abcdef.tmp"}
    assert done == set(files)
    assert run_json("verify", f"{src}/", f"{dst}/")["identical"] == len(files)


def test_ctrl_c_stops_the_copy_processes_too(tmp_path: Path, backend_factory: Any) -> None:
    """Copy processes ignore Ctrl-C; the stopped parent tells them, and they start nothing more
    (each holds a batch of items it has not begun)."""
    b = backend_factory("s3-moto")
    root = b.new_root()
    rnd = random.Random(6)
    files = {f"d{i % 10}/f{i:04d}.bin": rnd.randbytes(8 * 1024) for i in range(300)}
    b.seed(root, files)
    dst = tmp_path / "dst"
    with FaultProxy("127.0.0.1", b.handle.port) as proxy:
        # a slow downlink shared by every GET: ~30 files/s, so the run would take ~10 s
        proxy.add(Fault("slow_down", probability=1.0, bps=256 * 1024, method="GET", path=r"\.bin$"))
        address = re.sub(r"(@[^/@]+\.127\.0\.0\.1:)\d+/", rf"\g<1>{proxy.port}/", b.address(root), count=1)
        proc = start("--json", "--threads", str(THREADS), "--processes", "2", "-vv", "cp", address, f"{dst}/")
        try:
            wait_for("a few copies", lambda: len(files_at(dst)[0]) >= 3)
            helpers = psutil.Process(proc.pid).children()
            copied_before = files_at(dst)[0]
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
            _, alive = psutil.wait_procs(helpers, timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert "copying with 2 processes" in err and helpers, "no copy process was forked: nothing to test"
    assert alive == [], "a copy process outlived the run"
    copied_after, temps = files_at(dst)
    assert len(copied_after - copied_before) <= THREADS, sorted(copied_after - copied_before)
    assert temps == set()
