"""Copy processes (engine/fanout.py): a run split over forked processes gives the same result,
the same counts and the same FAILED lines as one process, and survives losing a helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from helpers import digests, md5s, run_cli, run_json, write_tree
from servers.faultproxy import Fault, FaultProxy
from test_faults import via

FILES = {f"d{i % 9}/f{i:04d}.bin": os.urandom(1000 + i) for i in range(400)}


def _helpers_of(pid: int) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(pid).children() if "ossimport" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _wait_for(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := predicate():
            return got
        time.sleep(0.02)
    return None


def test_two_processes_copy_every_file_once(backend_factory: Any, tmp_path: Path) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    write_tree(tmp_path / "src", FILES)
    up = run_json("-v", "--processes", "2", "--threads", "8", "cp", f"{tmp_path}/src/", s3.address(root))
    assert "copying with 2 processes (threads: 4+4)" in up["_stderr"]
    assert (up["found"], up["copied"], up["failed"]) == (400, 400, 0)
    assert up["copied_bytes"] == sum(map(len, FILES.values()))
    assert digests(s3.storage(root)) == md5s(FILES)
    # each helper reports what it copied: "copied KEY" lines (-v) name every file exactly once
    copied = [ln.rsplit(" ", 1)[1] for ln in up["_stderr"].splitlines() if " copied " in ln]
    assert sorted(copied) == sorted(FILES)

    down = run_json("--processes", "2", "--threads", "8", "sync", s3.address(root), f"{tmp_path}/dst/")
    assert (down["copied"], down["failed"]) == (400, 0)
    assert {str(p.relative_to(tmp_path / "dst")): p.read_bytes()
            for p in (tmp_path / "dst").rglob("*") if p.is_file()} == FILES
    again = run_json("--processes", "2", "sync", s3.address(root), f"{tmp_path}/dst/")
    assert (again["copied"], again["skipped"]) == (0, 400)


def test_failures_in_a_helper_are_reported_like_any_other(backend_factory: Any, tmp_path: Path) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    bad = {f"d{i}/../../escape{i}.txt": b"x" for i in range(6)}  # refused on a file system
    s3.seed(root, {**FILES, **bad})
    proc = run_cli("--json", "--processes", "3", "--threads", "9", "cp", s3.address(root), f"{tmp_path}/dst/")
    assert proc.returncode == 1, proc.stderr
    failed = sorted(ln.split(":", 1)[0] for ln in proc.stderr.splitlines() if ln.startswith("FAILED "))
    assert failed == sorted(f"FAILED {k}" for k in bad), proc.stderr
    assert all("InvalidObjectName" in ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED "))
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert '"copied": 400' in summary[-1] and '"failed": 6' in summary[-1]
    assert not list(tmp_path.glob("escape*")) and not (tmp_path.parent / "escape0.txt").exists()


def _slow_download(backend_factory: Any, tmp_path: Path) -> tuple[FaultProxy, str, Path, str]:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    s3.seed(root, FILES)
    proxy = FaultProxy("127.0.0.1", s3.handle.port).start()
    # every GET answer crosses a 150 KB/s link: the ~600 KB take ~4 s
    proxy.add(Fault("slow_down", probability=1.0, method="GET", bps=150_000, query=r"^$"))
    return proxy, via(s3.address(root), proxy), tmp_path / "dst", s3.address(root)


def test_a_killed_helper_is_replaced_by_the_parent(backend_factory: Any, tmp_path: Path) -> None:
    proxy, src, dst, _ = _slow_download(backend_factory, tmp_path)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ossimport", "--json", "--processes", "2", "--threads", "8",
                                 "cp", src, f"{dst}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        helpers = _wait_for(lambda: _helpers_of(proc.pid), 20)
        assert helpers, "no copy process was started"
        assert _wait_for(lambda: dst.exists() and sum(1 for _ in dst.rglob("*.bin")) >= 20, 30)
        os.kill(helpers[0].pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        proxy.stop()
    assert proc.returncode == 0, err
    assert "a copy process exited unexpectedly" in err
    assert '"copied": 400' in out and '"failed": 0' in out
    assert {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == FILES


def test_ctrl_c_ends_every_process(backend_factory: Any, tmp_path: Path) -> None:
    proxy, src, dst, direct = _slow_download(backend_factory, tmp_path)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ossimport", "--processes", "2", "--threads", "8",
                                 "cp", src, f"{dst}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        helpers = _wait_for(lambda: _helpers_of(proc.pid), 20)
        assert helpers, "no copy process was started"
        assert _wait_for(lambda: dst.exists() and any(dst.rglob("*.bin")), 30)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the whole group
        _, err = proc.communicate(timeout=60)
        gone = _wait_for(lambda: not any(h.is_running() and h.status() != psutil.STATUS_ZOMBIE
                                         for h in helpers), 30)
    finally:
        proxy.stop()
    assert proc.returncode == 130, err
    assert "interrupted; run the same command again to resume" in err and "Traceback" not in err
    assert gone, "a copy process outlived the interrupted run"
    # nothing half-written under a final name: every file present is whole
    for p in dst.rglob("*.bin"):
        assert p.read_bytes() == FILES[str(p.relative_to(dst))]
    done = sum(1 for _ in dst.rglob("*.bin"))
    assert done < 400, "the interrupt came too late to test anything"
    rest = run_json("sync", direct, f"{dst}/")
    assert (rest["copied"], rest["skipped"], rest["failed"]) == (400 - done, done, 0)
