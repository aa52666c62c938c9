"""Under CI=true a test server that cannot start fails its tests instead of skipping them: test.sh
installs every server, so a skip there means a broken install that a green run would hide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SELECTED = ["tests/test_s3.py::test_percent_escaped_secret_is_decoded", "-k", "s3-ceph"]


def run_suite(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    # an empty PATH: the Ceph binaries are "not installed" (the interpreter is named by its path)
    env = {**os.environ, "CI": ci, "PATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *SELECTED],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_server_is_a_skip_on_a_workstation_and_a_failure_in_ci(tmp_path: Path) -> None:
    here = run_suite(tmp_path, "")
    assert here.returncode == 0 and "skipped" in here.stdout and "Ceph binaries not found" in here.stdout, here.stdout
    ci = run_suite(tmp_path, "true")
    assert ci.returncode == 1 and "2 errors" in ci.stdout and "skipped" not in ci.stdout, ci.stdout
    assert "a test server is unavailable under CI=true: Ceph binaries not found" in ci.stdout
