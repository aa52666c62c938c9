"""`console import` (import.sh): one job from submit to its end, ossimport's one-click import.

It submits the job (or resumes it, or cleans and resubmits it), starts the master and local
workers where they are not running, prints the status every --interval seconds (each line also
goes to logs/import.log) and, when tasks failed, offers a retry: `--yes` retries at most
--max-retries times, then names the failed files and exits 1.

It stops what it started for its job and nothing else: a master that was running before (for
other jobs, or started by `console start`) keeps running, and so does one still serving another
active job. Incremental jobs never end: their master and workers stay.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ossimport.jobs.console import (
    _ask,
    _configs,
    _job_path,
    _stop_all,
    cmd_start,
    cmd_submit,
    master_alive,
    retry_job,
    status,
    stop_processes,
)
from ossimport.jobs.store import WorkDir
from ossimport.jobs.tracker import TaskCounts

ACTIVE = ("RUNNING", "WAITING", "SUBMITTED")
SHOWN_FAILED_FILES = 5


class _Say:
    """Print a line and append it to logs/import.log (which stamps it with date and time)."""

    def __init__(self, wd: WorkDir) -> None:
        self.wd = wd

    def __call__(self, text: str, *, clock: bool = False) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}" if clock else text, flush=True)
        self.wd.log("import.log", text)


def run_import(args: argparse.Namespace) -> int:
    from ossimport.jobs.config import load_job

    sysconf, wd = _configs(args)
    cfg = load_job(_job_path(args), allow_short_interval=sysconf.allowShortIncrementalInterval)
    name = cfg.jobName
    wd.create()
    say = _Say(wd)
    was_running = master_alive(wd)
    if wd.exists(name):
        choice = "n" if args.restart else "y" if args.resume or args.yes else _ask(
            f"job {name} has state from an earlier run: resume from breakpoint (y) or start over (n)? ", "y")
        if choice == "n":
            # a master holds the old job in memory: restart it (harmless for other jobs: their
            # workers keep their tasks and reconnect); the workers carry on
            stop_processes([wd.run / "master.pid"])
            wd.clean(name)
            say("the job's earlier state was removed: starting over")
    if not wd.exists(name):
        cmd_submit(args)
    cmd_start(args)
    try:
        return _watch(args, wd, name, say)
    finally:
        if not cfg.isIncremental and not was_running and not _others_active(wd, name):
            _stop_all(wd)


def _watch(args: argparse.Namespace, wd: WorkDir, name: str, say: _Say) -> int:
    retries = 0
    while True:
        st = _wait_for_end(wd, name, args.interval, say)
        if st["JobState"] == "SUCCEED":
            say(f"job {name} succeeded: {st['Files Done']} files, {st['Bytes Done']} bytes")
            return 0
        if st["JobState"] == "STOPPED":
            say(f"job {name} stopped: its master is not running (see {wd.logs / 'ossimport2.log'}); "
                "run import again to resume")
            return 1
        say(_failure(wd, name, st))
        if args.yes:
            if retries >= args.max_retries:
                say(f"job {name} still failed after {retries} retries (--max-retries {args.max_retries}); "
                    "giving up")
                return 1
            choice = "y"
        else:
            choice = _ask("scan the source again (y/n)? " if st["Scan Error"] else "retry the failed tasks (y/n)? ",
                          "n")
        if choice != "y":
            return 1
        retries += 1
        moved, rescan = retry_job(wd.job(name))
        say(f"retry {retries}: {moved} failed tasks back to pending" + ("; scanning the source again" if rescan
                                                                       else ""))


def _failure(wd: WorkDir, name: str, st: dict[str, Any]) -> str:
    """What failed and where to look, naming the first few failed files."""
    job = wd.job(name)
    if st.get("Scan Error"):
        return f"job {name} FAILED: its source could not be listed: {st['Scan Error']}"
    failed: list[str] = []
    for _, path in job.tasks("failed_tasks"):
        try:
            failed.extend(k for k in (path / "error.list").read_text(encoding="utf-8").splitlines() if k)
        except FileNotFoundError:
            continue
    shown = ", ".join(failed[:SHOWN_FAILED_FILES])
    more = f" and {len(failed) - SHOWN_FAILED_FILES} more" if len(failed) > SHOWN_FAILED_FILES else ""
    return (f"job {name} FAILED: {st['Failed Task Count']} failed tasks, {len(failed)} failed files: {shown}{more}; "
            f"all are listed in {job.root / 'failed_tasks'}/*/error.list and their causes in audit.log")


def _wait_for_end(wd: WorkDir, name: str, interval: float, say: _Say) -> dict[str, Any]:
    last_print = 0.0
    counts = TaskCounts()  # twice a second: read only the tasks that changed
    while True:
        served = master_alive(wd)
        st = status(wd, name, served, counts)
        if not served and st["JobState"] == "SUBMITTED":
            st["JobState"] = "STOPPED"  # queued, and no master to take it
        now = time.monotonic()
        if now - last_print >= interval:
            say(f"{name}: {st['JobState']}, tasks pending {st['Pending Task Count']} dispatched "
                f"{st['Dispatched Task Count']} succeeded {st['Succeed Task Count']} failed "
                f"{st['Failed Task Count']}, files done {st['Files Done']}/{st['Files Total']}", clock=True)
            last_print = now
        if st["JobState"] in ("SUCCEED", "FAILED", "STOPPED"):
            return st
        time.sleep(0.5)


def _others_active(wd: WorkDir, name: str) -> bool:
    """Another job that a running master still works on (or will take from the queue)."""
    others = [j.name for j in wd.jobs() if j.name != name] + [n for n in wd.queued() if n != name]
    return any(status(wd, other, True)["JobState"] in ACTIVE for other in others)
