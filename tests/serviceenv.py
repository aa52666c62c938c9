"""A running `ossimport serve` under test: its own conf dir and working dir, a real process on
127.0.0.1 (port chosen by the kernel, read from the line it prints), real HTTP.

    env = ServiceEnv(tmp_path, sys={...overrides...}); env.start()
    status, body = env.call("CreateJob", jobName=..., ...)
    env.stop()  # always (the fixture does it): the service, then the job master and workers
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from jobenv import free_port, write_properties


class ServiceEnv:
    def __init__(self, tmp: Path, sys_overrides: dict[str, Any] | None = None, workers: bool = True) -> None:
        self.tmp = tmp
        self.conf = tmp / "conf"
        self.conf.mkdir(parents=True, exist_ok=True)
        self.workdir = tmp / "run"
        values: dict[str, Any] = {
            "workingDir": str(self.workdir),
            "masterAddress": f"tcp://127.0.0.1:{free_port()}",
            "workerCount": 1,
            "workerTaskThreadNum": 4,
            "leaseSeconds": 5,
            "heartbeatSeconds": 1,
            "allowShortIncrementalInterval": True,
        }
        values.update(sys_overrides or {})
        write_properties(self.conf / "sys.properties", values)
        self.workers = workers
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []
        self.env = dict(os.environ, OSSIMPORT_STAT_INTERVAL="0.5")

    @property
    def sys_path(self) -> Path:
        return self.conf / "sys.properties"

    def start(self, listen: str = "127.0.0.1:0", timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", "ossimport", "serve", "--sys", str(self.sys_path), "--listen", listen]
        if not self.workers:
            argv.append("--no-workers")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            m = re.search(r"on (http://\S+?)/ ", line)
            if m:
                self.url = m[1]
                return
        raise AssertionError(f"the service did not start: {''.join(self.output)}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.output.append(self.proc.stdout.read())
            self.proc = None
        subprocess.run([sys.executable, "-m", "ossimport", "console", "--sys", str(self.sys_path), "stop"],
                       capture_output=True, text=True, env=self.env, timeout=60)

    # ---- requests ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def call(self, action: str, headers: dict[str, str] | None = None, **params: Any) -> tuple[int, dict[str, Any]]:
        status, data, _ = self.request("POST", f"/api/{action}", json.dumps(params).encode(),
                                       {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(data)

    def ok(self, action: str, **params: Any) -> dict[str, Any]:
        status, body = self.call(action, **params)
        assert status == 200, f"{action}: {status} {body}"
        return body

    def wait(self, predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_job(self, name: str, states: set[str], timeout: float = 90.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.ok("DescribeJob", JobName=name)["Job"]
            return job if job["State"] in states else None

        return self.wait(done, timeout, f"job {name} to reach {states}")
