"""A job system under test: its own conf dir, working dir and master port; real processes.

    env = JobEnv(tmp_path, job={...job.cfg keys...}, sys={...overrides...})
    env.console("submit"); env.console("start", "--workers", "2")
    st = env.wait_state({"SUCCEED"}, timeout=120)
    env.stop()  # always (the fixture does it)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_properties(path: Path, values: dict[str, Any]) -> None:
    lines = []
    for k, v in values.items():
        v = str(v).lower() if isinstance(v, bool) else str(v)
        lines.append(f"{k}={v}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class JobEnv:
    def __init__(self, tmp: Path, job: dict[str, Any], sys_overrides: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.conf = tmp / "conf"
        self.conf.mkdir(parents=True, exist_ok=True)
        self.workdir = tmp / "run"
        self.port = free_port()
        sys_values: dict[str, Any] = {
            "workingDir": str(self.workdir),
            "masterAddress": f"tcp://127.0.0.1:{self.port}",
            "workerTaskThreadNum": 8,
            "leaseSeconds": 5,
            "heartbeatSeconds": 1,
            "allowShortIncrementalInterval": True,
        }
        sys_values.update(sys_overrides or {})
        write_properties(self.conf / "sys.properties", sys_values)
        job_values: dict[str, Any] = {"jobName": "test_job", "isAuditAfterImport": True, "auditMode": "general"}
        job_values.update(job)
        write_properties(self.conf / "local_job.cfg", job_values)
        self.env = dict(os.environ)
        self.env["OSSIMPORT_STAT_INTERVAL"] = "0.5"
        self.env.update(env or {})
        self.job_name = str(job_values["jobName"])

    # ---- commands ---------------------------------------------------------------------------------
    def console(self, *args: str, check: bool = True, timeout: float = 120,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "ossimport", "console", "--conf-dir", str(self.conf), *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout, input=input)
        if check:
            assert proc.returncode == 0, f"console {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def run_template(self, template: str, overrides: dict[str, Any], files: int) -> dict[str, Any]:
        """Run an upstream job.cfg template unchanged but for `overrides` (appended: a key given
        twice takes the later value, as upstream's properties loader does) on one worker; assert it
        SUCCEEDs with exactly `files` files done."""
        (self.conf / "local_job.cfg").write_text(
            template + "\n" + "".join(f"{k}={v}\n" for k, v in overrides.items()), encoding="utf-8")
        self.console("submit")
        self.console("start", "--workers", "1")
        st = self.wait_state({"SUCCEED", "FAILED"}, timeout=180)
        assert st["JobState"] == "SUCCEED", self.log_tail()
        assert (st["Files Total"], st["Files Done"], st["Files Failed"]) == (files, files, 0)
        return st

    def stat(self, name: str | None = None) -> dict[str, Any]:
        """One job's status (`stat --json` prints a list of jobs, here of one)."""
        [st] = json.loads(self.console("stat", "--json", name or self.job_name).stdout)
        return st

    def wait_state(self, states: set[str], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.stat()
            if st.get("JobState") in states:
                return st
            time.sleep(0.3)
        raise AssertionError(f"job did not reach {states} in {timeout}s; last status {st}\n{self.log_tail()}")

    def wait_for(self, predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        path = self.workdir / "logs" / "ossimport2.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"

    # ---- processes --------------------------------------------------------------------------------
    def pids(self, kind: str) -> list[int]:
        """Live pids of `master` or `worker` processes started for this env."""
        out = []
        for pid_file in (self.workdir / "run").glob(f"{kind}*.pid"):
            try:
                pid = int(pid_file.read_text())
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except (ValueError, psutil.Error, FileNotFoundError):
                pass
        return out

    def kill9(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        try:
            psutil.Process(pid).wait(10)
        except psutil.Error:
            pass

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "ossimport", "console", "--conf-dir", str(self.conf), "stop"],
                       capture_output=True, text=True, env=self.env, timeout=60)

    # ---- state on disk ----------------------------------------------------------------------------
    @property
    def job_dir(self) -> Path:
        return self.workdir / "master" / "jobs" / self.job_name

    def task_dirs(self, state: str) -> list[Path]:
        base = self.job_dir / state
        if not base.exists():
            return []
        if state == "dispatched":
            return sorted(p for w in base.iterdir() for p in w.iterdir())
        return sorted(base.iterdir())

    def audit_keys(self, state: str = "succeed_tasks") -> list[str]:
        """Every key named in the audit logs of a state's tasks (COPIED/SKIPPED/VERIFIED lines)."""
        keys = []
        for t in self.task_dirs(state):
            for line in (t / "audit.log").read_text(encoding="utf-8").splitlines():
                kind, key, _ = line.split("\t", 2)
                if kind in ("COPIED", "SKIPPED", "VERIFIED"):
                    keys.append(key)
        return keys
