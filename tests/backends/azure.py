"""Azure Blob Storage through Azurite, Microsoft's emulator (npm package `azurite`, installed by
test.sh into .azurite/), on 127.0.0.1 with a port the kernel picks. Path-style addresses:
http://127.0.0.1:PORT/ACCOUNT/CONTAINER, shared-key signatures checked."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from backends import unavailable

NAME = "azure"
ROOT = Path(__file__).resolve().parents[2]
# Azurite's built-in account and key (public, documented by Microsoft for the emulator)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENS = re.compile(r"successfully listens on http://127\.0\.0\.1:(\d+)")


@dataclass
class Handle:
    proc: subprocess.Popen[bytes]
    port: int
    container: str
    log: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


def azurite_bin() -> str | None:
    """azurite-blob from test.sh's install (.azurite/), else from PATH."""
    local = ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


def start(tmp: Path) -> Handle:
    binary = azurite_bin()
    if binary is None or shutil.which("node") is None:
        unavailable("Azurite not installed: run ./test.sh (npm install --prefix .azurite azurite)")
    log = tmp / "azurite.log"
    (tmp / "data").mkdir(exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(tmp / "data"),
             "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 60  # node starts in ~1 s; a loaded 2-core machine takes longer
    port = None
    while port is None:
        if m := _LISTENS.search(log.read_text(errors="replace")):
            port = int(m[1])
        elif proc.poll() is not None:
            unavailable(f"Azurite exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        elif time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"Azurite did not listen within 60 s: {log.read_text(errors='replace')[-2000:]}")
        else:
            time.sleep(0.05)  # poll interval, bounded by the deadline above
    handle = Handle(proc, port, f"c{uuid.uuid4().hex[:12]}", log)
    container_client(handle).create_container()
    return handle


def container_client(handle: Handle):  # type: ignore[no-untyped-def]
    from azure.storage.blob import ContainerClient

    return ContainerClient(f"http://{handle.endpoint}/{ACCOUNT}", handle.container,
                           credential={"account_name": ACCOUNT, "account_key": KEY})


def stop(handle: Handle) -> None:
    handle.proc.terminate()
    try:
        handle.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        handle.proc.kill()
        handle.proc.wait()


def address(handle: Handle, root: str) -> str:
    # the key's '/' is written %2F, as users must
    return f"azure://{ACCOUNT}:{quote(KEY, safe='')}@{handle.container}.{handle.endpoint}/{root}/"


def env(handle: Handle) -> dict[str, str]:
    return {}

