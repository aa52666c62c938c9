"""Azurite, Microsoft's Azure Storage emulator (npm package `azurite`, installed by test.sh into
.azurite/), started on 127.0.0.1 with a port the kernel picks. Shared-key signatures are checked;
addresses are path-style: http://127.0.0.1:PORT/ACCOUNT/CONTAINER.

No pytest here: the test fixtures (tests/backends/azure.py) and the benchmark (bench/servers.py)
both start it through `Azurite`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Azurite's built-in account and key (public, documented by Microsoft for the emulator)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENS = re.compile(r"successfully listens on http://127\.0\.0\.1:(\d+)")


class Unavailable(RuntimeError):
    """Azurite cannot run here (not installed, or it exited at once): the message says why."""


def azurite_bin() -> str | None:
    """azurite-blob from test.sh's install (.azurite/), else from PATH."""
    local = ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


class Azurite:
    """One azurite-blob process keeping its data under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "azurite.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The account's blob service URL."""
        return f"http://{self.endpoint}/{ACCOUNT}"

    def start(self, deadline_s: float = 60) -> Azurite:
        """Start and wait until it listens. Raises Unavailable, or TimeoutError past the deadline
        (node starts in ~1 s; a loaded 2-core machine takes longer)."""
        binary = azurite_bin()
        if binary is None or shutil.which("node") is None:
            raise Unavailable("Azurite not installed: run ./test.sh (npm install --prefix .azurite azurite)")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(self.workdir / "data"),
                 "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + deadline_s
        while True:
            if m := _LISTENS.search(self.log.read_text(errors="replace")):
                self.port = int(m[1])
                return self
            if self.proc.poll() is not None:
                raise Unavailable(f"Azurite exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Azurite did not listen within {deadline_s:.0f} s: {self.tail()}")
            time.sleep(0.05)  # poll interval, bounded by the deadline above

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def container_client(self, container: str):  # type: ignore[no-untyped-def]
        from azure.storage.blob import ContainerClient

        return ContainerClient(self.url, container, credential={"account_name": ACCOUNT, "account_key": KEY})
