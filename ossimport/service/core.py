"""The service's state: working directory, configuration, database, live events, executors.

Handlers receive one `Service`; it owns nothing the job system owns (jobs stay directories in
the working directory) and starts the master and local workers the way `console.sh start` does.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from ossimport.jobs.config import SysConfig
from ossimport.jobs.store import WorkDir
from ossimport.service.db import Database
from ossimport.service.events import Events


class Workers:
    """The working directory's master and local workers, through `console.sh start|stop` (so
    they are the same background processes, found again by their pid files)."""

    def __init__(self, sys_path: Path, enabled: bool = True) -> None:
        self.sys_path = sys_path
        self.enabled = enabled

    def _console(self, *command: str) -> None:
        if not self.enabled:
            return
        subprocess.run([sys.executable, "-m", "ossimport", "console", "--sys", str(self.sys_path), *command],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, check=False)

    def start(self) -> None:
        self._console("start", "--no-service")  # this process is the service

    def stop(self) -> None:
        self._console("stop")


def _single_service(directory: Path) -> int:
    """Hold `service.lock` for this process's life: two services on one working directory would
    both run its subtasks. The kernel drops the lock when the process dies, kill -9 included."""
    import fcntl
    import os

    from ossimport.errors import UsageError

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "service.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(f"another service (pid {other}) is running for {directory.parent}; use it, or stop it "
                         "first (console.sh stop)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Service:
    def __init__(self, sysconf: SysConfig, sys_path: Path, *, start_workers: bool = True) -> None:
        self.sysconf = sysconf
        self.conf_dir = sys_path.parent  # conf/filesystems lives beside sys.properties
        self.workdir = WorkDir(sysconf.workingDir)
        self.workdir.create()
        self._lock_file = _single_service(self.workdir.root / "service")
        self.db = Database(self.workdir.root / "service" / "service.db")
        self.events = Events()
        self.workers = Workers(sys_path, start_workers)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        from ossimport.service.live import Ticker
        from ossimport.service.subtasks import Executor  # the engine is loaded only when serving

        self.executor = Executor(self)
        self.ticker = Ticker(self)

    @property
    def credentials(self) -> dict[str, str]:
        """The service's own key pair (id -> secret); empty: requests are not authenticated."""
        ak, sk = self.sysconf.serviceAccessKeyId, self.sysconf.serviceAccessKeySecret
        return {ak: sk} if ak and sk else {}

    def lock_for(self, action: str, token: str) -> threading.Lock:
        """One lock per (action, ClientToken): two concurrent retries of one create make one."""
        with self._locks_guard:
            if len(self._locks) > 10000:
                self._locks.clear()  # only in-flight pairs matter; the database keeps the answers
            return self._locks.setdefault((action, token), threading.Lock())

    def start(self) -> None:
        self.workers.start()
        self.ticker.expire()  # before the executor: what waited too long while we were down never starts
        self.executor.start()
        self.ticker.start()

    def close(self) -> None:
        import os

        self.ticker.close()
        self.executor.close()
        self.db.close()
        os.close(self._lock_file)
