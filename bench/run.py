"""Benchmark ossimport against rclone, awscli and s3cmd on servers it starts on 127.0.0.1.

    python bench/run.py [--rounds 3] [--scenarios a,b,...] [--quick] [--out bench/results.json]

See bench/README.md for the scenarios and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

if __package__ in (None, ""):  # run as a script: make `bench` and `ossimport` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import (  # noqa: E402
    AzuriteServer,
    Endpoint,
    Server,
    SshServer,
    make_server,
)
from bench.tools import (  # noqa: E402
    S3,
    Azure,
    Loc,
    Local,
    Ours,
    Rclone,
    RunResult,
    Sftp,
    Tool,
    ToolContext,
    compile_ours,
    ensure_peers,
    find_bin,
    make_tools,
    run_measured,
)
from bench.workloads import WORKLOADS, GiB, MiB, materialize, scan_local  # noqa: E402

OPS = ("upload", "download", "s3copy", "sync")
DEFAULT_WORKLOADS = ("small2k", "small20k", "big256", "big1g", "mixed")
QUICK_WORKLOADS = ("small2k", "big256")
COPY_OPS = ("upload", "download", "s3copy")
SFTP_WORKLOADS = ("small2k", "big256")  # local -> SFTP (`sftp` alone names these)
AZURE_OPS = ("azure-upload", "azure-download")  # local <-> Azure Blob on Azurite
AZURE_WORKLOADS = ("small2k", "big256")  # `azure` alone names their upload and download
JOB_WORKERS = (1, 2, 4)  # job<N>-<workload>: the job system with N local workers
JOB_WORKLOAD = "small20k"
CEILING_OPS, CEILING_WORKLOADS = ("upload", "download"), ("big256", "big1g")
# peers that cannot take part in a scenario: shown as n/a (rather than left out) with this reason
NOT_APPLICABLE = {"sftp": ("awscli", "s3cmd"), "azure": ("awscli", "s3cmd")}
SEED_BUCKET, PREFIX = "seed", "data/"


@dataclass(frozen=True)
class Scenario:
    name: str
    op: str  # upload | download | s3copy | sync | mem1m | sftp | job | azure-upload | azure-download
    workload: str
    workers: int = 0  # job: local worker processes


def job_scenario(workers: int, workload: str) -> Scenario:
    return Scenario(f"job{workers}-{workload}", "job", workload, workers)


def all_scenarios() -> dict[str, Scenario]:
    out = {f"{op}-{w}": Scenario(f"{op}-{w}", op, w) for op in OPS for w in WORKLOADS if w != "mem1m"}
    out["mem1m"] = Scenario("mem1m", "mem1m", "mem1m")
    out.update({f"sftp-{w}": Scenario(f"sftp-{w}", "sftp", w) for w in WORKLOADS if w != "mem1m"})
    out.update({f"{op}-{w}": Scenario(f"{op}-{w}", op, w) for op in AZURE_OPS for w in WORKLOADS if w != "mem1m"})
    for n in JOB_WORKERS:
        out.update({f"job{n}-{w}": job_scenario(n, w) for w in WORKLOADS if w != "mem1m"})
    return out


def default_names(quick: bool) -> list[str]:
    wls = QUICK_WORKLOADS if quick else DEFAULT_WORKLOADS
    names = [f"{op}-{w}" for w in wls for op in COPY_OPS]
    if quick:
        return [*names, "sftp-small2k"]
    return [
        *names,
        "sync-insync100k",
        *(f"sftp-{w}" for w in SFTP_WORKLOADS),
        *(f"job{n}-{JOB_WORKLOAD}" for n in JOB_WORKERS),
    ]


def pick_scenarios(spec: str | None, quick: bool) -> list[Scenario]:
    known = all_scenarios()
    if not spec:
        return [known[n] for n in default_names(quick)]
    picked: list[Scenario] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        m = re.fullmatch(r"job(\d+)(?:-(\w+))?", tok)
        if tok in known:
            names = [tok]
        elif m and 1 <= int(m[1]) <= 64 and (m[2] or JOB_WORKLOAD) in WORKLOADS and m[2] != "mem1m":
            sc = job_scenario(int(m[1]), m[2] or JOB_WORKLOAD)  # any worker count: job3-small2k
            known[sc.name] = sc
            names = [sc.name]
        elif tok == "job":
            names = [f"job{n}-{JOB_WORKLOAD}" for n in JOB_WORKERS]
        elif tok == "sftp":
            names = [f"sftp-{w}" for w in SFTP_WORKLOADS]
        elif tok == "azure":
            names = [f"{op}-{w}" for w in AZURE_WORKLOADS for op in AZURE_OPS]
        elif tok == "insync100k":
            names = ["sync-insync100k"]
        elif tok in WORKLOADS:
            names = [f"{op}-{tok}" for op in COPY_OPS]
        elif tok == "sync":
            names = ["sync-insync100k"]
        elif tok in OPS:
            names = [f"{tok}-{w}" for w in (QUICK_WORKLOADS if quick else DEFAULT_WORKLOADS)]
        else:
            ops = " ".join([*OPS, "sftp", *AZURE_OPS])
            raise SystemExit(
                f"unknown scenario {tok!r}; write OP-WORKLOAD (OP: {ops}; WORKLOAD: "
                f"{' '.join(w for w in WORKLOADS if w != 'mem1m')}), jobN-WORKLOAD, mem1m, "
                "a workload, an operation, sftp, azure or job"
            )
        picked += [known[n] for n in names if known[n] not in picked]
    return picked


# ----------------------------------------------------------------------------- one scenario


def seed(server: Server, ep: Endpoint, seed_loc: S3 | Azure, src_root: Path, want_count: int, scratch: Path,
         timeout: float) -> None:
    """Put the workload under seed/data/ (`seed_loc`) with rclone (the fastest client here)."""
    rclone = find_bin("rclone")
    if not rclone:
        raise RuntimeError("seeding needs rclone")
    server.create_bucket(ep, SEED_BUCKET)
    ctx = ToolContext(ep, scratch, 16)
    argv, env, cwd = Rclone(rclone).command("copy", Local(src_root), seed_loc, ctx)
    res = run_measured(argv, env, cwd, timeout, scratch / "seed-log")
    got = sum(1 for _ in server.iter_objects(ep, SEED_BUCKET, PREFIX))
    if res.rc != 0 or got != want_count:
        raise RuntimeError(
            f"seeding failed (rc={res.rc}, {got}/{want_count} objects): {res.stderr_tail[-800:]}"
        )
    time.sleep(1.1)  # so objects a sync run rewrites have a later LastModified second than the seed


def verify(
    dst: Loc, server: Server, ep: Endpoint | None, count: int, total: int, keys: set[str] | None, since: float
) -> tuple[str, int]:
    """'' if dst holds exactly the expected files, else why not; also how many objects are newer than `since`."""
    newer = 0
    if isinstance(dst, Local | Sftp):  # the sshd's folder is local disk too
        got_count, got_total, got_keys = scan_local(dst.path)
    else:
        assert ep is not None
        got_count = got_total = 0
        got_keys = set()
        for o in server.iter_objects(ep, dst.bucket, dst.prefix):
            got_count += 1
            got_total += int(o["Size"])
            got_keys.add(o["Key"][len(dst.prefix) :])
            if o["LastModified"].timestamp() >= int(since):
                newer += 1
    if got_count != count or got_total != total:
        return f"expected {count} files / {total} bytes, found {got_count} / {got_total}", newer
    if keys is not None and got_keys != keys:
        missing, extra = sorted(keys - got_keys)[:3], sorted(got_keys - keys)[:3]
        return f"names differ: missing {missing}, unexpected {extra}", newer
    return "", newer


def plan_tools(sc: Scenario, tools: list[Tool]) -> tuple[list[Tool], dict[str, str]]:
    """The tools that run in `sc`, and those shown as n/a (name -> reason). Others are left out."""
    run: list[Tool] = []
    na: dict[str, str] = {}
    for t in tools:
        if sc.op == "mem1m":
            keep = t.local_to_local
        elif t.name == "ceiling":
            keep = sc.op in CEILING_OPS and sc.workload in CEILING_WORKLOADS
        elif sc.op == "job":
            keep = t.name in ("ours", "rclone")  # rclone: its plain upload of the same tree
        elif sc.op == "sftp":
            keep = t.sftp
            if not keep and t.name in NOT_APPLICABLE["sftp"]:
                na[t.name] = "n/a: no SFTP support"
        elif sc.op in AZURE_OPS:
            keep = t.name in ("ours", "rclone")
            if t.name in NOT_APPLICABLE["azure"]:
                na[t.name] = "n/a: no Azure Blob support"
        else:
            keep = True
        if keep:
            run.append(t)
    return run, na


def run_scenario(
    sc: Scenario,
    tools: list[Tool],
    servers: dict[str, Server],
    args: argparse.Namespace,
    work: Path,
    entry: dict[str, Any],
) -> None:
    """Run one scenario, filling `entry` as it goes (so an interrupted scenario keeps its runs)."""
    wl = WORKLOADS[sc.workload]
    count, total = wl.totals()
    tools, na = plan_tools(sc, tools)
    server = servers["sftp"] if sc.op == "sftp" else servers["azure"] if sc.op in AZURE_OPS else servers["s3"]
    runs: list[dict[str, Any]] = entry["runs"]
    entry["workload"] = {"name": wl.name, "description": wl.description, "files": count, "bytes": total}
    entry["server"] = server.name if sc.op != "mem1m" else None
    if sc.op == "job":
        entry["workers"] = sc.workers
    entry["summary_fn"] = lambda: summarize(runs, tools, count, total, na)
    free = shutil.disk_usage(work).free
    if free < 3 * total + GiB:
        raise RuntimeError(
            f"not enough disk space under {work}: {free >> 20} MiB free, need ~{(3 * total + GiB) >> 20}"
        )
    t = time.monotonic()
    src_root = materialize(wl, work / "cache")
    log(
        f"[{sc.name}] workload {wl.name}: {count} files, {total / MiB:.1f} MiB (ready in {time.monotonic() - t:.1f}s)"
    )
    keys = wl.keys()
    scratch = work / "scratch" / sc.name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ep: Endpoint | None = None
    restart_each_run = args.restart == "run" or (args.restart == "auto" and server.persistent)
    try:
        if sc.op != "mem1m":
            ep = server.start(scratch / "server")
            if sc.op in ("download", "s3copy", "sync", "azure-download"):
                t = time.monotonic()
                seed_loc = Azure(SEED_BUCKET, PREFIX) if sc.op in AZURE_OPS else S3(SEED_BUCKET, PREFIX)
                seed(server, ep, seed_loc, src_root, count, scratch, args.timeout)
                log(f"[{sc.name}] seeded in {time.monotonic() - t:.1f}s")
        for rnd in range(1, args.rounds + 1):
            for tool in tools:
                if restart_each_run and server.persistent and sc.op != "mem1m":
                    ep = server.start(scratch / "server")  # a fresh process; the data stays
                runs.append(one_run(sc, tool, rnd, ep, server, src_root, count, total, keys, scratch, args))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def one_run(sc: Scenario, tool: Tool, rnd: int, ep: Endpoint | None, server: Server, src_root: Path,
            count: int, total: int, keys: set[str] | None, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    tag = f"r{rnd}-{tool.name}"
    bucket = f"{tag}-dst"
    op = "sync" if sc.op in ("sync", "mem1m") else "copy"
    src: Loc
    dst: Loc
    if sc.op in ("upload", "job"):
        src, dst = Local(src_root), S3(bucket, PREFIX)
    elif sc.op == "download":
        src, dst = S3(SEED_BUCKET, PREFIX), Local(scratch / "out" / tag)
    elif sc.op == "s3copy":
        src, dst = S3(SEED_BUCKET, PREFIX), S3(bucket, PREFIX)
    elif sc.op == "sync":
        src, dst = Local(src_root), S3(SEED_BUCKET, PREFIX)  # already in sync: a no-op
    elif sc.op == "sftp":
        assert ep is not None
        src, dst = Local(src_root), Sftp(Path(ep.extra["root"]) / tag)
    elif sc.op == "azure-upload":
        src, dst = Local(src_root), Azure(bucket, PREFIX)
    elif sc.op == "azure-download":
        src, dst = Azure(SEED_BUCKET, PREFIX), Local(scratch / "out" / tag)
    else:
        src, dst = Local(src_root), Local(scratch / "out" / tag)
    if isinstance(dst, Local | Sftp):
        dst.path.mkdir(parents=True, exist_ok=True)
    elif dst.bucket != SEED_BUCKET:
        assert ep is not None
        server.create_bucket(ep, dst.bucket)
    os.sync()  # no dirty pages from the previous run are flushed during this one
    confdir = scratch / "conf" / tag
    confdir.mkdir(parents=True, exist_ok=True)
    ctx = ToolContext(ep, confdir, args.threads)
    job = sc.op == "job" and isinstance(tool, Ours)
    if job:
        assert isinstance(src, Local) and isinstance(dst, S3)
        argv, env, cwd = tool.job_command(src, dst, ctx, sc.workers)
    else:
        argv, env, cwd = tool.command(op, src, dst, ctx)
    load_before = round(os.getloadavg()[0], 2)
    started = time.time()
    job_log = ""
    try:
        res = run_measured(argv, env, cwd, args.timeout, scratch / "logs" / tag)
    finally:
        if job:  # the master and workers run in sessions of their own: stop them by their pid files
            assert isinstance(tool, Ours)
            job_log = tool.job_stop(confdir)
    problem, newer = verify(dst, server, ep, count, total, keys, started)
    if res.timed_out:
        problem = f"timed out after {args.timeout:.0f}s"
    elif res.rc != 0:
        problem = f"exit code {res.rc}" + (f"; {problem}" if problem else "")
    if problem and job_log:
        res.stderr_tail += "\n--- ossimport2.log ---\n" + job_log
    rec: dict[str, Any] = {
        "round": rnd,
        "tool": tool.name,
        "ok": not problem,
        "problem": problem,
        **asdict(res),
    }
    rec["argv"] = [mask(a, ep) for a in argv]
    rec["loadavg_before"] = load_before
    if sc.op == "sync":
        rec["rewritten_objects"] = newer
    if not problem:
        rec["stderr_tail"] = res.stderr_tail[-500:]
    status = "ok" if not problem else f"FAILED: {problem}"
    log(
        f"[{sc.name}] round {rnd} {tool.name:7s} {res.seconds:8.2f}s  rss {res.peak_rss / MiB:7.1f} MiB  {status}"
    )
    if problem and res.stderr_tail.strip():
        log("    " + res.stderr_tail.strip()[-600:].replace("\n", "\n    "))
    # Clean up, so disk use stays bounded.
    if isinstance(dst, Local | Sftp):
        shutil.rmtree(dst.path, ignore_errors=True)
    elif dst.bucket != SEED_BUCKET:
        assert ep is not None
        with contextlib.suppress(Exception):
            server.wipe_bucket(ep, dst.bucket)
    shutil.rmtree(confdir, ignore_errors=True)
    return rec


def mask(arg: str, ep: Endpoint | None) -> str:
    if ep is None or not ep.secret_key:  # the sshd's endpoint has no secret key (its key is a file)
        return arg
    return arg.replace(ep.secret_key, "***").replace(quote(ep.secret_key, safe=""), "***")


def summarize(
    runs: list[dict[str, Any]], tools: list[Tool], count: int, total: int, na: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for tool in tools:
        mine = [r for r in runs if r["tool"] == tool.name]
        good = [r for r in mine if r["ok"]]
        row: dict[str, Any] = {
            "tool": tool.name,
            "runs": len(mine),
            "ok": len(good),
            "note": tool.threads_note,
        }
        if good:
            med = statistics.median(r["seconds"] for r in good)
            row.update(
                median_s=med,
                files_per_s=count / med if med else None,
                mib_per_s=total / MiB / med if med else None,
                peak_rss_mib=max(r["peak_rss"] for r in good) / MiB,
                cpu_s=statistics.median(r["cpu_seconds"] for r in good),
            )
            rewritten = [r["rewritten_objects"] for r in good if "rewritten_objects" in r]
            if any(rewritten):
                row["note"] = (
                    row["note"] + "; " if row["note"] else ""
                ) + f"rewrote up to {max(rewritten)} objects"
        bad = [r for r in mine if not r["ok"]]
        if bad:
            row["failure"] = bad[0]["problem"]
            row["failure_stderr"] = bad[0]["stderr_tail"][-1500:]
        rows.append(row)
    ours = next((r for r in rows if r["tool"] == "ours" and r.get("median_s")), None)
    for row in rows:
        if ours and row["tool"] != "ours" and row.get("median_s"):
            row["ours_over_peer"] = ours["median_s"] / row["median_s"]
    rows += [{"tool": name, "runs": 0, "ok": 0, "na": True, "note": why} for name, why in (na or {}).items()]
    return rows


# ----------------------------------------------------------------------------- start-up, table, main


def startup_times(tools: list[Tool], n: int, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool in (t for t in tools if not t.pseudo):
        argv, env = tool.version_argv(), tool.base_env()
        samples: list[RunResult] = [
            run_measured(argv, env, tool.cwd, 60, work / "startup" / tool.name) for _ in range(n)
        ]
        ok = [s.seconds for s in samples if s.rc == 0]
        out[tool.name] = {
            "argv": argv,
            "median_s": statistics.median(ok) if ok else None,
            "ok": len(ok),
            "runs": n,
            "peak_rss_mib": max(s.peak_rss for s in samples) / MiB,
            "failure": "" if ok else samples[-1].stderr_tail[-800:],
        }
        med = out[tool.name]["median_s"]
        log(
            f"[startup] {tool.name:7s} "
            + (f"{med * 1000:7.1f} ms" if med else f"FAILED: {out[tool.name]['failure'][-300:]}")
        )
    return out


def fmt(v: Any, width: int, digits: int) -> str:
    if not isinstance(v, int | float):
        return "-".rjust(width)
    if digits == 0 and abs(v) < 100:  # rates below 100/s: keep two significant decimals
        digits = 2
    return f"{v:{width}.{digits}f}"


def table(results: dict[str, Any]) -> str:
    head = f"{'scenario':22s} {'tool':8s} {'ok':>5s} {'median s':>9s} {'files/s':>9s} {'MiB/s':>8s} {'RSS MiB':>8s} {'CPU s':>7s} {'ours/peer':>9s}  note"
    lines = [head, "-" * len(head)]
    for sc in results["scenarios"]:
        for row in sc["summary"]:
            note = row.get("note", "")
            if row.get("failure"):
                note = (note + "; " if note else "") + f"FAILED: {row['failure'][:70]}"
            ok = "n/a" if row.get("na") else f"{row['ok']}/{row['runs']}"
            lines.append(
                f"{sc['name']:22s} {row['tool']:8s} {ok:>5s} {fmt(row.get('median_s'), 9, 2)} "
                f"{fmt(row.get('files_per_s'), 9, 0)} {fmt(row.get('mib_per_s'), 8, 1)} "
                f"{fmt(row.get('peak_rss_mib'), 8, 1)} {fmt(row.get('cpu_s'), 7, 2)} "
                f"{fmt(row.get('ours_over_peer'), 9, 2)}  {note}".rstrip()
            )
        if sc.get("error"):
            lines.append(f"{sc['name']:22s} scenario FAILED: {sc['error'][:150]}")
    st = results.get("startup") or {}
    if st:
        lines.append("")
        runs = next(iter(st.values()))["runs"]
        parts = [
            f"{k} {fmt(v['median_s'] * 1000 if v['median_s'] else None, 0, 1)} ms" for k, v in st.items()
        ]
        lines.append(f"start-up (--version, median of {runs}): " + ", ".join(parts))
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario (default 3)")
    p.add_argument(
        "--scenarios",
        help="comma list: scenario names (upload-small2k, sftp-big256, job4-small20k), workloads (small2k) or "
        "operations (upload, sftp, job); mem1m only when named",
    )
    p.add_argument(
        "--quick", action="store_true", help="only the small2k and big256 workloads (and sftp-small2k)"
    )
    p.add_argument(
        "--out", default="bench/results.json", help="JSON results file (default bench/results.json)"
    )
    p.add_argument(
        "--tools",
        default="ours,rclone,awscli,s3cmd,ceiling",
        help="comma list of tools (default all four and the ceiling pseudo-tool)",
    )
    p.add_argument("--threads", type=int, default=16, help="concurrency given to every tool (default 16)")
    p.add_argument(
        "--server", default="rclone", choices=("rclone", "ceph"), help="S3 server (default rclone serve s3)"
    )
    p.add_argument("--restart", default="auto", choices=("auto", "run", "scenario"),
                   help="restart the server before every run (auto: when its data survives a restart) or per scenario")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per tool run (default 1800)")
    p.add_argument(
        "--startup-runs", type=int, default=10, help="--version runs per tool for start-up time (0: skip)"
    )
    p.add_argument(
        "--workdir", help="keep workloads here and reuse them next time (default: a temp dir, removed)"
    )
    p.add_argument("--no-install", action="store_true", help="do not pip-install missing peers")
    args = p.parse_args(argv)
    args.rounds = max(1, min(args.rounds, 100))

    scenarios = pick_scenarios(args.scenarios, args.quick)
    notes: list[str] = []
    if not args.no_install:
        ensure_peers(notes)
    compile_ours()
    tools = make_tools([t.strip() for t in args.tools.split(",") if t.strip()], notes)
    for n in notes:
        log(n)
    server = make_server(args.server, find_bin("rclone"))
    sshd = SshServer()
    azurite = AzuriteServer()
    servers: dict[str, Server] = {"s3": server, "sftp": sshd, "azure": azurite}
    uses_sftp = any(sc.op == "sftp" for sc in scenarios)
    uses_azure = any(sc.op in AZURE_OPS for sc in scenarios)
    if uses_sftp and sshd.available():
        log(f"warning: the SFTP scenarios will fail: {sshd.available()}")
    if uses_azure and azurite.available():
        log(f"warning: the Azure scenarios will fail: {azurite.available()}")
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ossimport-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "rounds": args.rounds,
            "server": args.server,
            "server_version": server.version(),
            "sftp_server": f"{sshd.name} ({sshd.version()})" if uses_sftp else None,
            "azure_server": azurite.version() if uses_azure else None,
            "tools": {
                t.name: {"exe": t.exe, "version": safe_version(t), "note": t.threads_note} for t in tools
            },
            "notes": notes,
        },
        "startup": {},
        "scenarios": [],
    }
    load = os.getloadavg()[0]
    results["meta"]["loadavg_at_start"] = round(load, 2)
    if load > 0.5 * (os.cpu_count() or 1):
        log(
            f"warning: load average {load:.2f} on {os.cpu_count()} CPUs: other work is running, timings will be noisy"
        )
    rc = 0
    try:
        if args.startup_runs > 0:
            results["startup"] = startup_times(tools, args.startup_runs, work)
        for sc in scenarios:
            entry: dict[str, Any] = {"name": sc.name, "op": sc.op, "runs": [], "summary": []}
            results["scenarios"].append(entry)
            try:
                run_scenario(sc, tools, servers, args, work, entry)
            except Exception as e:  # one broken scenario must not stop the others
                log(f"[{sc.name}] scenario failed: {type(e).__name__}: {e}")
                entry["error"] = f"{type(e).__name__}: {e}"
                rc = 1
            finally:
                if "summary_fn" in entry:
                    entry["summary"] = entry.pop("summary_fn")()
                write_json(out_path, results)
    except KeyboardInterrupt:
        log("interrupted; stopping")
        rc = 130
    finally:
        for srv in servers.values():
            srv.stop()
        write_json(out_path, results)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    log(f"results written to {out_path}")
    return rc


def safe_version(tool: Tool) -> str:
    try:
        return tool.version()
    except (OSError, subprocess.SubprocessError) as e:  # still benchmarked (and it will fail)
        return f"unknown ({type(e).__name__})"


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
