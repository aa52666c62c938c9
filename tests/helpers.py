"""Helpers for end-to-end tests: trees of files, reading a root back, running the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ossimport.storage.base import Storage

MiB = 1024 * 1024


def tree(big: int = 0, seed: int = 1) -> dict[str, bytes]:
    """A nested tree with unicode names, a zero-byte file and, if `big`, one file of that size."""
    rnd = random.Random(seed)
    files = {
        "top.txt": b"top level\n",
        "empty.dat": b"",
        "a/b/c/deep.bin": rnd.randbytes(70_000),
        "a/b/sibling.txt": b"sibling\n" * 100,
        "a/x y (1).txt": b"spaces and parens",
        "ünï/文件 名.txt": "日本語のテキスト".encode(),
        "z/last.txt": b"z",
    }
    for i in range(20):
        files[f"many/f{i:03d}.txt"] = rnd.randbytes(rnd.randint(1, 5000))
    if big:
        files["large/blob.bin"] = rnd.randbytes(big)
    return files


def via(address: str, proxy: Any) -> str:
    """The same address, reached through a proxy on 127.0.0.1 (tests/servers/faultproxy.py)."""
    new, n = re.subn(r"(@[^/@]+\.127\.0\.0\.1:)\d+/", rf"\g<1>{proxy.port}/", address, count=1)
    assert n == 1, address
    return new


def compat_dir() -> Path:
    """The upstream ossimport job templates (../shared/compat/ossimport-conf): beside the checkout,
    or beside its parent for a worktree under wt/. The first place is returned when neither has them."""
    here = Path(__file__).resolve().parents
    places = [p / "shared" / "compat" / "ossimport-conf" for p in (here[2], here[3])]
    return next((p for p in places if p.is_dir()), places[0])


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def digests(st: Storage) -> dict[str, str]:
    """key -> md5 of everything under a storage root, read through the storage itself."""
    out = {}
    for e in st.list():
        with st.open(e.key) as f:
            out[e.key] = hashlib.md5(f.read()).hexdigest()
    return out


def md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.md5(v).hexdigest() for k, v in files.items()}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m ossimport ARGS` as a user would, in its own process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ossimport", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, input=input,
    )


def run_json(*args: str, env: dict[str, str] | None = None, ok: bool = True,
             timeout: float = 300) -> dict[str, Any]:
    """Run with --json and return the summary; assert the exit code matches `ok`."""
    proc = run_cli("--json", *args, env=env, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    else:
        assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    summary = json.loads(lines[-1])
    summary["_stderr"] = proc.stderr
    return summary
