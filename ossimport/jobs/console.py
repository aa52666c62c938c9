"""`ossimport console CMD` (console.sh), `ossimport master` and `ossimport worker`.

    console [--conf-dir conf] [--sys FILE] submit [CFG] | start [--workers N] | stop |
            stat [--json] [JOB] | retry [JOB] | clean [JOB] | deploy | version |
            import [--yes|--resume|--restart] [--interval S] [CFG]
    master  --sys FILE                            (started by `console start`)
    worker  --master tcp://HOST:PORT [--workdir DIR] [--curve-keys DIR] [--max-throughput KBPS]
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
from ossimport.jobs.store import WorkDir
from ossimport.jobs.tracker import STAT_FIELDS, job_status

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
    from ossimport.jobs.security import ensure_keys, is_loopback_endpoint

    sysconf, wd = _configs(args)
    wd.create()
    sys_path = str(Path(args.sys or Path(args.conf_dir) / "sys.properties").resolve())
    curve = not is_loopback_endpoint(sysconf.masterAddress)
    if curve:
        ensure_keys(Path(sysconf.curveKeysDir))
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
                "--max-throughput", str(sysconf.workerMaxThroughput), "--heartbeat", str(sysconf.heartbeatSeconds)]
        if curve:
            argv += ["--curve-keys", str(sysconf.curveKeysDir)]
        _spawn(wd, f"worker-{i}", argv)
    print(f"{count} local workers running")
    if sysconf.serviceAddress and not getattr(args, "no_service", False):
        _start_service(wd, sys_path, sysconf.serviceAddress)
    return 0


def _start_service(wd: WorkDir, sys_path: str, address: str, wait: float = 15.0) -> None:
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
    import psutil

    pids = {}
    for pid_file in list(wd.run.glob("*.pid")) if wd.run.exists() else []:
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


def status(wd: WorkDir, name: str) -> dict[str, Any]:
    job = wd.job(name)
    if not job.root.exists():
        return {"JobName": name, "JobState": "SUBMITTED", "Pending Task Count": 0, "Dispatched Task Count": 0,
                "Succeed Task Count": 0, "Failed Task Count": 0, "Is Scan Finished": False}
    st = job_status(job)
    try:
        rates = json.loads(job.stat_path.read_text())
        st["Throughput (bytes/s)"] = rates.get("Throughput (bytes/s)", 0.0)
        st["ETA (s)"] = rates.get("ETA (s)")
    except (FileNotFoundError, ValueError):
        st["Throughput (bytes/s)"], st["ETA (s)"] = 0.0, None
    return st


def cmd_stat(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    names = _pick_job(wd, args.job)
    stats = [status(wd, n) for n in names]
    if args.json:
        print(json.dumps(stats if args.job is None else stats[0]))
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
        if key in st:
            value = st[key]
            value = str(value).lower() if isinstance(value, bool) else value
            print(f"{key}:{'' if value is None else value}")
    print()


def cmd_retry(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    total = 0
    for name in _pick_job(wd, args.job):
        job = wd.job(name)
        if job.root.exists():
            n = job.retry_failed()
            total += n
            wd.log("ossimport2.log", f"job {name}: {n} failed tasks moved back to pending")
    print(f"{total} failed tasks moved back to pending")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    _, wd = _configs(args)
    names = _pick_job(wd, args.job)
    if not names:
        print("no jobs to clean")
    for name in names:
        wd.clean(name)
        print(f"cleaned job {name}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from ossimport.jobs.deploy import deploy

    sysconf, _ = _configs(args)
    return deploy(sysconf, Path(args.conf_dir) / "workers")


def cmd_import(args: argparse.Namespace) -> int:
    from ossimport.jobs.config import load_job

    sysconf, wd = _configs(args)
    cfg = load_job(_job_path(args), allow_short_interval=sysconf.allowShortIncrementalInterval)
    name = cfg.jobName
    if wd.exists(name):
        choice = "y" if args.resume or args.yes else "n" if args.restart else _ask(
            f"job {name} has state from an earlier run: resume from breakpoint (y) or start over (n)? ", "y")
        if choice == "n":
            _stop_all(wd)
            wd.clean(name)
    if not wd.exists(name):
        cmd_submit(args)
    cmd_start(args)
    try:
        while True:
            st = _wait_for_end(wd, name, args.interval)
            if st["JobState"] == "SUCCEED":
                print(f"job {name} succeeded: {st['Files Done']} files, {st['Bytes Done']} bytes")
                return 0
            failed_dir = wd.job(name).root / "failed_tasks"
            print(f"job {name} finished with {st['Failed Task Count']} failed tasks; failed files are listed in "
                  f"{failed_dir}/*/error.list and their causes in audit.log")
            choice = "y" if args.yes else _ask("retry the failed tasks (y/n)? ", "n")
            if choice != "y":
                return 1
            wd.job(name).retry_failed()
    finally:
        if not cfg.isIncremental:
            _stop_all(wd)


def _wait_for_end(wd: WorkDir, name: str, interval: float) -> dict[str, Any]:
    last_print = 0.0
    while True:
        st = status(wd, name)
        now = time.monotonic()
        if now - last_print >= interval:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {st['JobState']}, tasks pending "
                  f"{st['Pending Task Count']} dispatched {st['Dispatched Task Count']} succeeded "
                  f"{st['Succeed Task Count']} failed {st['Failed Task Count']}, files done "
                  f"{st.get('Files Done', 0)}/{st.get('Files Total', 0)}", flush=True)
            last_print = now
        if st["JobState"] in ("SUCCEED", "FAILED"):
            return st
        time.sleep(0.5)


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
    p.add_argument("--curve-keys", help="directory with worker.key_secret and master.key")
    p.add_argument("--max-throughput", type=int, default=0, help="KB/s, 0 = unlimited")
    p.add_argument("--heartbeat", type=float, default=2.0)
    args = p.parse_args(argv)
    worker = Worker(args.master, Path(args.workdir), heartbeat=args.heartbeat,
                    max_throughput_kbps=args.max_throughput,
                    curve=CurveClientKeys(Path(args.curve_keys)) if args.curve_keys else None)
    _on_term(worker.stop_event.set)
    worker.run()
    return 0


def _on_term(callback: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


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
    s = sub.add_parser("clean", help="remove a job's state")
    s.add_argument("job", nargs="?")
    sub.add_parser("deploy", help="install and start workers on the hosts in CONF_DIR/workers over SSH")
    sub.add_parser("version", help="print the version")
    s = sub.add_parser("import", help="one-click: submit, start, watch, offer retry")
    s.add_argument("cfg", nargs="?")
    s.add_argument("--yes", "-y", action="store_true", help="answer yes: resume, and retry failures")
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
