"""`ossimport console CMD` (console.sh), `ossimport master` and `ossimport worker`.

    console [--conf-dir conf] [--sys FILE] submit [CFG] | start [--workers N] | stop |
            stat [--json] [JOB] | retry [JOB] | clean [JOB | --all] | deploy [--trust-new-hosts] | version |
            import [--yes [--max-retries N]|--resume|--restart] [--interval S] [CFG]   (jobs/oneclick.py)
    master  --sys FILE                            (started by `console start`)
    worker  --master tcp://HOST:PORT --curve-keys DIR [--workdir DIR] [--max-throughput KBPS]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ossimport import __version__
from ossimport.errors import UsageError
from ossimport.jobs.store import JobDir, WorkDir
from ossimport.jobs.tracker import STAT_FIELDS, TaskCounts, empty_status, job_status

PIDS = ("master",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see 'console.sh -h')")


def _configs(args: argparse.Namespace) -> tuple[Any, WorkDir]:
    from ossimport.jobs.config import load_sys

    sys_path = Path(args.sys or Path(args.conf_dir) / "sys.properties")
    if not sys_path.exists():
        raise UsageError(f"{sys_path} does not exist: pass --sys FILE or run from the ossimport directory")
    sysconf = load_sys(sys_path)
    return sysconf, WorkDir(sysconf.workingDir)


def _job_path(args: argparse.Namespace) -> Path:
    path = Path(getattr(args, "cfg", None) or Path(args.conf_dir) / "local_job.cfg")
    if not path.exists():
        raise UsageError(f"job config {path} does not exist")
    return path


def _pick_job(wd: WorkDir, name: str | None) -> list[str]:
    names = [j.name for j in wd.jobs()] + wd.queued()
    if name:
        if name not in names:
            raise UsageError(f"no job named {name!r}; jobs: {', '.join(names) or 'none'}")
        return [name]
    return names


# ---- commands -------------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from ossimport.jobs.config import load_job
    from ossimport.jobs.submit import submit_job

    sysconf, wd = _configs(args)
    path = _job_path(args)
    cfg = load_job(path, allow_short_interval=sysconf.allowShortIncrementalInterval)
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    submit_job(wd, cfg, str(path))
    print(f"submitted job {cfg.jobName}")
    return 0


def _alive(pid_file: Path) -> int | None:
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "ossimport" not in " ".join(proc.cmdline()):
            return None
        return pid
    except (FileNotFoundError, ValueError, psutil.Error):
        return None


def _spawn(wd: WorkDir, name: str, argv: list[str]) -> int:
    log = open(wd.logs / "ossimport2.log", "a")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "ossimport", *argv], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    (wd.run / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _local_master_address(address: str) -> str:
    host_port = address.split("://", 1)[1]
    port = host_port.rsplit(":", 1)[1]
    host = host_port.rsplit(":", 1)[0].strip("[]")
    return f"tcp://127.0.0.1:{port}" if host in ("0.0.0.0", "*", "::") else address


def cmd_start(args: argparse.Namespace) -> int:
    from ossimport.jobs.security import ensure_keys

    sysconf, wd = _configs(args)
    wd.create()
    sys_path = str(Path(args.sys or Path(args.conf_dir) / "sys.properties").resolve())
    ensure_keys(Path(sysconf.curveKeysDir))  # the master admits only workers with these keys, loopback too
    if _alive(wd.run / "master.pid") is None:
        _spawn(wd, "master", ["master", "--sys", sys_path])
        print(f"master started on {sysconf.masterAddress}")
    else:
        print("master is already running")
    count = args.workers if args.workers is not None else sysconf.resolved_worker_count()
    running = [p for p in wd.run.glob("worker-*.pid") if _alive(p)]
    addr = _local_master_address(sysconf.masterAddress)
    for i in range(count):
        pid_file = wd.run / f"worker-{i}.pid"
        if pid_file in running:
            continue
        argv = ["worker", "--master", addr, "--workdir", str(wd.root),
                "--max-throughput", str(sysconf.workerMaxThroughput), "--heartbeat", str(sysconf.heartbeatSeconds),
                "--curve-keys", str(sysconf.curveKeysDir)]
        _spawn(wd, f"worker-{i}", argv)
    print(f"{count} local workers running")
    if sysconf.serviceAddress and not getattr(args, "no_service", False):
        _start_service(wd, sys_path, sysconf.serviceAddress)
    return 0


def _start_service(wd: WorkDir, sys_path: str, address: str, wait: float = 60.0) -> None:
    """`ossimport serve` beside the master (it finds the master and workers already running)."""
    import socket

    if _alive(wd.run / "service.pid") is None:
        _spawn(wd, "service", ["serve", "--sys", sys_path, "--no-workers"])
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            print(f"service and web UI on http://{address}/")
            return
        except OSError:
            if _alive(wd.run / "service.pid") is None:
                break
            time.sleep(0.1)
    print(f"the service did not start on {address}; see {wd.logs / 'ossimport2.log'}", file=sys.stderr)


def cmd_stop(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    stopped = _stop_all(wd)
    print(f"stopped {stopped} processes" if stopped else "nothing was running")
    return 0


def _stop_all(wd: WorkDir, timeout: float = 15.0) -> int:
    """Stop the master and every local worker `start` launched; returns how many were running."""
    return stop_processes(list(wd.run.glob("*.pid")) if wd.run.exists() else [], timeout)


def stop_processes(pid_files: list[Path], timeout: float = 15.0) -> int:
    """SIGTERM the live processes of these pid files, SIGKILL what outlives `timeout`."""
    import psutil

    pids = {}
    for pid_file in pid_files:
        pid = _alive(pid_file)
        if pid is not None:
            pids[pid] = pid_file
        else:
            pid_file.unlink(missing_ok=True)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)
    for pid_file in pids.values():
        pid_file.unlink(missing_ok=True)
    return len(pids)


def master_alive(wd: WorkDir) -> bool:
    return _alive(wd.run / "master.pid") is not None


def status(wd: WorkDir, name: str, served: bool | None = None, counts: TaskCounts | None = None) -> dict[str, Any]:
    """A job's status; `served`: a master is running (None: look, see master_alive); `counts`: what
    a caller that asks again and again (import) has read before."""
    job = wd.job(name)
    if not job.root.exists():
        return empty_status(name, "SUBMITTED")
    st = job_status(job, counts, served=master_alive(wd) if served is None else served)
    if st["JobState"] == "RUNNING":  # rates from the master's last tick; none while nothing moves
        try:
            rates = json.loads(job.stat_path.read_text())
            st["Throughput (bytes/s)"] = rates.get("Throughput (bytes/s)", 0.0)
            st["ETA (s)"] = rates.get("ETA (s)")
        except (FileNotFoundError, ValueError):
            pass
    return st


def cmd_stat(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    names = _pick_job(wd, args.job)
    served = master_alive(wd)
    stats = [status(wd, n, served) for n in names]
    if args.json:
        print(json.dumps(stats))  # always a list, with or without a job name
        return 0
    if not stats:
        print("no jobs are running or finished")
        return 0
    for st in stats:
        print_stat(st)
    return 0


def print_stat(st: dict[str, Any]) -> None:
    order = list(STAT_FIELDS) + [k for k in st if k not in STAT_FIELDS]
    for key in order:
        value = st.get(key)
        if value is None and key not in STAT_FIELDS:
            continue  # no ETA when nothing runs, no Next Pass unless waiting, no Scan Error unless failed
        value = str(value).lower() if isinstance(value, bool) else value
        print(f"{key}:{'' if value is None else value}")
    print()


def retry_job(job: JobDir) -> tuple[int, bool]:
    """Failed tasks back to pending, and a source that could not be listed scanned again.
    (tasks moved, whether the scan is tried again)"""
    return job.retry_failed(), job.set_scan_error(None)


def cmd_retry(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    total = 0
    for name in _pick_job(wd, args.job):
        job = wd.job(name)
        if job.root.exists():
            n, rescan = retry_job(job)
            total += n
            wd.log("ossimport2.log", f"job {name}: {n} failed tasks moved back to pending")
            if rescan:
                print(f"job {name}: its source will be scanned again")
    print(f"{total} failed tasks moved back to pending")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    if args.all:
        if args.job:
            raise UsageError("name one job or pass --all, not both")
        names = _pick_job(wd, None)
        if names and sys.stdin.isatty() and _ask(f"remove the state of every job ({', '.join(names)}) "
                                                 "(y/n)? ", "n") != "y":
            print("nothing cleaned")
            return 1
    else:
        name = args.job or _conf_job_name(args, wd)
        if not args.job and not wd.exists(name):
            print(f"no job named {name} to clean")
            return 0
        names = _pick_job(wd, name)
    if not names:
        print("no jobs to clean")
    for name in names:
        wd.clean(name)
        print(f"cleaned job {name}")
    return 0


def _conf_job_name(args: argparse.Namespace, wd: WorkDir) -> str:
    """The jobName of CONF_DIR/local_job.cfg: what `clean` acts on when no job is named."""
    from ossimport.jobs.config import load_job

    path = Path(args.conf_dir) / "local_job.cfg"
    if not path.exists():
        jobs = ", ".join(_pick_job(wd, None)) or "none"
        raise UsageError(f"{path} does not exist: name the job ('console.sh clean JOB'; jobs: {jobs}) "
                         "or pass --all to clean every job")
    return load_job(path).jobName


def cmd_deploy(args: argparse.Namespace) -> int:
    from ossimport.jobs.deploy import deploy

    sysconf, _ = _configs(args)
    return deploy(sysconf, Path(args.conf_dir) / "workers", trust_new_hosts=args.trust_new_hosts)


def cmd_import(args: argparse.Namespace) -> int:
    from ossimport.jobs.oneclick import run_import

    return run_import(args)


def _ask(question: str, default: str) -> str:
    if not sys.stdin.isatty():
        print(f"{question}{default} (not a terminal: default)")
        return default
    answer = input(question).strip().lower()[:1]
    return answer if answer in ("y", "n") else default


# ---- processes ------------------------------------------------------------------------------------------
def run_master(argv: list[str]) -> int:
    from ossimport.jobs.config import load_sys
    from ossimport.jobs.master import Master
    from ossimport.jobs.plan import plan_loader

    p = _Parser(prog="ossimport master")
    p.add_argument("--sys", required=True)
    args = p.parse_args(argv)
    sysconf = load_sys(Path(args.sys))
    wd = WorkDir(sysconf.workingDir)
    master = Master(wd, sysconf.masterAddress, plan_loader(sysconf), lease=sysconf.leaseSeconds,
                    stat_interval=float(os.environ.get("OSSIMPORT_STAT_INTERVAL", "10")),
                    curve_keys=Path(sysconf.curveKeysDir))
    _on_term(master.stop_event.set)
    master.run()
    return 0


def run_worker(argv: list[str]) -> int:
    from ossimport.jobs.security import CurveClientKeys
    from ossimport.jobs.worker import Worker

    p = _Parser(prog="ossimport worker")
    p.add_argument("--master", required=True, help="tcp://HOST:PORT of the master")
    p.add_argument("--workdir", default=os.path.expanduser("~/.ossimport-worker"))
    p.add_argument("--curve-keys", required=True,
                   help="directory with worker.key_secret and master.key (the master admits no worker without)")
    p.add_argument("--max-throughput", type=int, default=0, help="KB/s, 0 = unlimited")
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--subtask-slots", type=_count, default=4,
                   help="dataflow subtasks copied at once beside the job task (default 4, 0 = none)")
    args = p.parse_args(argv)
    worker = Worker(args.master, Path(args.workdir), heartbeat=args.heartbeat,
                    max_throughput_kbps=args.max_throughput,
                    curve=CurveClientKeys(Path(args.curve_keys)), subtask_slots=args.subtask_slots)
    _on_term(worker.stop_event.set)
    worker.run()
    return worker.exit_code


def _on_term(callback: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="console.sh", description="ossimport job console")
    p.add_argument("--conf-dir", default="conf", help="directory of local_job.cfg, sys.properties, workers")
    p.add_argument("--sys", help="sys.properties (default CONF_DIR/sys.properties)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser, required=True)
    s = sub.add_parser("submit", help="submit a job (default CONF_DIR/local_job.cfg)")
    s.add_argument("cfg", nargs="?")
    s = sub.add_parser("start", help="start the master and local workers in the background")
    s.add_argument("--workers", type=int, help="local worker processes (default workerCount or CPUs)")
    s.add_argument("--no-service", action="store_true", help="do not start the HTTP service (serviceAddress)")
    sub.add_parser("stop", help="stop the master and local workers")
    s = sub.add_parser("stat", help="job status")
    s.add_argument("job", nargs="?")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("retry", help="move failed tasks back to pending")
    s.add_argument("job", nargs="?")
    s = sub.add_parser("clean", help="remove a job's state (default: the job of CONF_DIR/local_job.cfg)")
    s.add_argument("job", nargs="?")
    s.add_argument("--all", action="store_true", help="remove the state of every job (asks on a terminal)")
    s = sub.add_parser("deploy", help="install and start workers on the hosts in CONF_DIR/workers over SSH")
    s.add_argument("--trust-new-hosts", action="store_true",
                   help="accept hosts not in ~/.ssh/known_hosts and record their keys there")
    sub.add_parser("version", help="print the version")
    s = sub.add_parser("import", help="one-click: submit, start, watch, offer retry")
    s.add_argument("cfg", nargs="?")
    s.add_argument("--yes", "-y", action="store_true",
                   help="answer yes: resume, and retry failures (at most --max-retries times)")
    s.add_argument("--max-retries", type=_count, default=3, metavar="N",
                   help="with --yes: retries before giving up (default 3)")
    s.add_argument("--resume", action="store_true", help="resume an existing job without asking")
    s.add_argument("--restart", action="store_true", help="clean an existing job and start over")
    s.add_argument("--interval", type=float, default=10.0, help="seconds between status lines")
    s.add_argument("--workers", type=int)
    return p


COMMANDS = {"submit": cmd_submit, "start": cmd_start, "stop": cmd_stop, "stat": cmd_stat, "retry": cmd_retry,
            "clean": cmd_clean, "deploy": cmd_deploy, "import": cmd_import}


def run_console(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "version":
        print(f"ossimport {__version__}")
        return 0
    return COMMANDS[args.cmd](args)
