"""`ossimport mount ADDRESS MOUNTPOINT` and `ossimport umount MOUNTPOINT`.

Everything that can be checked is checked before the mount goes to the background (the address,
/dev/fuse and libfuse 3, the mount point, the keys and the bucket, by listing the root once), so
a mistake is one line and exit 2 in the user's terminal, not a line in a log. Then the mount
process starts detached (`python -m ossimport.mount.command`, settings on its stdin so that no
key shows in `ps`); the command waits until the kernel has the mount (or it failed) and exits.

Per mount point, a state directory (XDG_CACHE_HOME or ~/.cache, then ossimport/mount/<hash>)
holds `pid`, `mount.log` and the spool of files being written (unless --cache-dir). `umount`
unmounts like fusermount3 -u (refused while a file is open there) and waits until the mount
process has uploaded what it still held and exited.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ossimport.errors import OssimportError, StorageError, UsageError

if TYPE_CHECKING:
    from ossimport.address import Location
    from ossimport.storage.base import Storage, StorageOptions

log = logging.getLogger("ossimport")

FUSE_DEVICE = "/dev/fuse"
READY = b"ready\n"


def add_parsers(sub: Any, size: Any, nonneg: Any) -> None:
    """The `mount` and `umount` subcommands (cli.py passes its option helpers)."""
    text = "show a bucket (or a prefix in it) as a folder; runs in the background unless -f"
    mp = sub.add_parser("mount", help=text, description=text)
    a = mp.add_argument
    # the global options that matter here (they may also stand before the command)
    hide = argparse.SUPPRESS
    a("--https", action="store_true", default=hide, help="talk to the store over HTTPS")
    a("--connTimeout", "--conntimeout", "--conn-timeout", dest="conn_timeout", type=nonneg, metavar="S",
      default=hide, help="seconds to establish a connection (default 30)")
    a("--timeout", type=nonneg, metavar="S", default=hide, help="seconds to wait for a response (default 120)")
    a("--anonymous", metavar="SIDE", default=hide, help="'src' or 'both': no credentials (public bucket)")
    a("--verbose", "-v", action="count", default=hide, help="log every upload (-vv: debug) to the mount log")
    a("address", metavar="ADDRESS", help="a bucket address as for cp, e.g. s3://ak:sk@bucket.host/prefix/")
    a("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    a("--foreground", "-f", action="store_true", help="stay in the foreground (stop with Ctrl-C)")
    a("--read-only", dest="read_only", action="store_true", help="refuse every change (EROFS)")
    a("--allow-other", dest="allow_other", action="store_true",
      help="let other users see the files (needs user_allow_other in /etc/fuse.conf unless root)")
    a("--attr-ttl", dest="attr_ttl", type=nonneg, default=1.0, metavar="S",
      help="seconds a file's size and mtime are cached (default 1)")
    a("--dir-ttl", dest="dir_ttl", type=nonneg, default=10.0, metavar="S",
      help="seconds a directory listing is cached (default 10)")
    a("--read-ahead", dest="read_ahead", type=size, default=64 * 1024 * 1024, metavar="SIZE",
      help="largest read-ahead window of one file read sequentially (default 64m)")
    a("--read-memory", dest="read_memory", type=size, default=256 * 1024 * 1024, metavar="SIZE",
      help="read-ahead memory shared by all open files (default 256m)")
    a("--read-threads", dest="read_threads", type=int, default=16, metavar="N",
      help="ranged GETs in flight across all open files (default 16)")
    a("--cache-dir", dest="cache_dir", metavar="DIR",
      help="where files being written are spooled until uploaded (default: the mount's state directory)")
    text = "unmount a folder made by 'ossimport mount', after its pending uploads"
    up = sub.add_parser("umount", aliases=["unmount"], help=text, description=text)
    up.add_argument("mountpoint", metavar="MOUNTPOINT")


# ---- state ------------------------------------------------------------------------------------------
def canonical(mountpoint: str) -> str:
    """The mount point's real path, resolving links on the way to it but not through it: a
    stat of a live mount would wait for the mount process itself (a deadlock inside its own
    init) and fails on a dead one."""
    path = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def state_dir(mountpoint: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(canonical(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(base, "ossimport", "mount", digest)


def mounted(mountpoint: str) -> bool:
    """Whether something is mounted at `mountpoint` (a dead FUSE mount too: os.path.ismount
    fails to stat one and says no)."""
    target = canonical(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                field = line.split()[4]
                if _unescape(field) == target:
                    return True
    except OSError:
        return os.path.ismount(target)
    return False


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _read_pid(state: str) -> int | None:
    try:
        with open(os.path.join(state, "pid"), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie is not: in a container nobody may ever reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---- checks before daemonising ----------------------------------------------------------------------
def check_fuse() -> None:
    """/dev/fuse usable and libfuse 3 installed; points mfusepy at libfuse 3."""
    if not os.path.exists(FUSE_DEVICE):
        raise UsageError(f"{FUSE_DEVICE} does not exist: load the fuse kernel module (modprobe fuse) or "
                         "start the container with --device /dev/fuse")
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR))
    except OSError as exc:
        raise UsageError(f"cannot open {FUSE_DEVICE} ({exc.strerror}): run as a user allowed to mount "
                         "(root, or a member of the fuse group)") from None
    if not os.environ.get("FUSE_LIBRARY_PATH"):
        import ctypes.util  # here, not at the top: the parser imports this module for every command

        lib = ctypes.util.find_library("fuse3")
        if not lib:
            raise UsageError("libfuse 3 is not installed: install the fuse3 package (apt-get install fuse3)")
        os.environ["FUSE_LIBRARY_PATH"] = lib


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.exists(mountpoint):
        raise UsageError(f"mount point {mountpoint} does not exist: create it (mkdir -p {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if mounted(mountpoint):
        raise UsageError(f"mount point {mountpoint} is busy: something is mounted there already "
                         f"(ossimport umount {mountpoint})")


def mount_location(address: str) -> Location:
    from ossimport.address import parse_address
    from ossimport.log import register_secret

    loc = parse_address(address)
    register_secret(loc.access_key, loc.secret_key, loc.token, loc.password)
    if loc.backend not in ("s3", "oss"):
        raise UsageError(f"{loc.display()} is not a bucket: mount takes an object store address such as "
                         "s3://ak:sk@bucket.endpoint/prefix/, oss://... or minio://...")
    if not loc.is_dir:  # the prefix names a directory either way
        loc = replace(loc, prefix=loc.prefix + "/", is_dir=True)
    return loc


def preflight(storage: Storage, loc: Location) -> None:
    """One listing of the root: wrong keys, a missing bucket or an unreachable endpoint show now."""
    try:
        list(storage.list_level("", limit=1))
    except StorageError as exc:
        from ossimport.log import redact

        raise UsageError(f"cannot mount {loc.display()}: {redact(str(exc))}") from None


# ---- mount ---------------------------------------------------------------------------------------------
def run_mount(args: argparse.Namespace, storage_options: StorageOptions) -> int:
    from ossimport.storage import open_storage

    loc = mount_location(args.address)
    mountpoint = os.path.abspath(args.mountpoint)
    check_fuse()
    check_mountpoint(mountpoint)
    if args.read_threads < 1:
        raise UsageError("--read-threads must be at least 1")
    # connections: one per read-ahead thread plus the FUSE threads that read and write directly
    st_opts = replace(storage_options, max_pool=args.read_threads + 32)
    storage = open_storage(loc, st_opts)
    try:
        preflight(storage, loc)
    finally:
        storage.close()
    state = state_dir(mountpoint)
    os.makedirs(state, mode=0o700, exist_ok=True)
    # the spool is this mount's own (emptied when it starts), also inside a shared --cache-dir
    spool = os.path.join(os.path.abspath(args.cache_dir), os.path.basename(state)) if args.cache_dir \
        else os.path.join(state, "spool")
    spec = {"args": vars(args), "storage": asdict(st_opts), "mountpoint": mountpoint, "spool": spool}
    if args.foreground:
        _serve(spec, None)
        return 0
    return _start_daemon(spec, state)


def _serve(spec: dict[str, Any], on_ready: Callable[[], None] | None) -> None:
    """Mount and serve until unmounted (runs in the mount process)."""
    from ossimport.mount.fs import FUSE, MountFS, MountOptions
    from ossimport.storage import open_storage
    from ossimport.storage.base import StorageOptions

    args = argparse.Namespace(**spec["args"])
    mountpoint = spec["mountpoint"]
    state = state_dir(mountpoint)
    opts = MountOptions(read_only=args.read_only, attr_ttl=args.attr_ttl, dir_ttl=args.dir_ttl,
                        read_ahead=args.read_ahead, read_memory=args.read_memory,
                        read_threads=args.read_threads)
    # held for the mount's life: a second mount process for this mount point (two `mount`
    # commands at once) must not empty the spool of the first
    lock = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UsageError(f"mount point {mountpoint} is busy: another ossimport mount is starting there") from None
    storage = open_storage(mount_location(args.address), StorageOptions(**spec["storage"]))
    pid_file = os.path.join(state, "pid")
    with open(pid_file, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")

    def ready() -> None:
        # the kernel sets its read-ahead when it gets the answer to INIT, after this callback:
        # widen it from a thread, once the mount answers a stat (so INIT is through)
        threading.Thread(target=lambda: os.stat(mountpoint) and widen_kernel_readahead(mountpoint),
                         name="widen-read-ahead", daemon=True).start()
        if on_ready:
            on_ready()

    fs = MountFS(storage, spec["spool"], opts, ready)
    kwargs: dict[str, Any] = {"foreground": True, "fsname": "ossimport", "subtype": "ossimport",
                              "max_threads": 64}
    if args.allow_other:
        kwargs.update(allow_other=True, default_permissions=True)
    if opts.read_only:
        kwargs["ro"] = True
    try:
        FUSE(fs, mountpoint, raw_fi=True, **kwargs)
    finally:
        storage.close()
        if _read_pid(state) == os.getpid():
            os.unlink(pid_file)


def widen_kernel_readahead(mountpoint: str, kib: int = 1024) -> None:
    """Let the kernel read ahead (and so ask us) 1 MiB at a time instead of its default 128 KiB:
    eight times fewer requests through Python for a sequential read. Root only (sysfs); others
    keep the default."""
    target = canonical(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            dev = next(line.split()[2] for line in f if _unescape(line.split()[4]) == target)
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kib))
    except (OSError, StopIteration) as exc:
        log.debug("kernel read-ahead of %s left as it is: %s", mountpoint, exc)


def _start_daemon(spec: dict[str, Any], state: str, timeout: float = 120.0) -> int:
    """Start the mount process detached (its own session, output to mount.log) and wait until it
    has mounted (0) or failed (2). It gets its settings on stdin, not on its command line, where
    every local user could read the keys for as long as the mount lasts."""
    log_path = os.path.join(state, "mount.log")
    r, w = os.pipe()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ossimport.mount.command", str(w)], stdin=subprocess.PIPE,
            stdout=log, stderr=log, cwd="/", start_new_session=True, pass_fds=(w,))
    os.close(w)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    said = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = pipe.read(4096)
            if not chunk:
                break  # the mount process said what it had to and closed its end (or died)
            said += chunk
    if said == READY:
        return 0
    if proc.poll() is None and not said:
        proc.kill()
        raise UsageError(f"the mount did not come up within {timeout:.0f}s; see {log_path}")
    text = said.decode("utf-8", "replace").strip()
    raise UsageError(text or f"the mount process ended before mounting; see {log_path}")


def _daemon_main(argv: list[str]) -> int:
    """The mount process: `python -m ossimport.mount.command READY_FD`, settings on stdin."""
    ready_fd = int(argv[0])
    spec = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    from ossimport import log as logsetup

    logsetup.setup(spec["args"].get("verbose") or 0)
    log_start = os.fstat(2).st_size  # the log is appended to: what this process says starts here
    told = False

    def ready() -> None:
        nonlocal told
        os.write(ready_fd, READY)
        os.close(ready_fd)
        told = True

    try:
        _serve(spec, ready)
    except BaseException as exc:  # noqa: BLE001 - reported to the waiting command or the log
        if not told:
            log_path = os.path.join(state_dir(spec["mountpoint"]), "mount.log")
            why = str(exc) if isinstance(exc, OssimportError) else _last_fuse_line(log_path, log_start) or exc
            os.write(ready_fd, f"cannot mount: {why}".encode())
        print(f"mount ended: {exc}", file=sys.stderr)
        return 2
    finally:
        if not told:
            os.close(ready_fd)
    return 0


def _last_fuse_line(log_path: str, start: int) -> str:
    """libfuse says why a mount failed on stderr (now the log, from `start`): its last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.readlines()[-20:] if ln.strip().startswith("fuse")]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---- umount --------------------------------------------------------------------------------------------
def run_umount(args: argparse.Namespace, timeout: float = 600.0) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if not mounted(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    state = state_dir(mountpoint)
    pid = _read_pid(state)
    tool = ["fusermount3", "-u", mountpoint]
    if os.geteuid() == 0 and not _which("fusermount3"):
        tool = ["umount", mountpoint]
    try:
        done = subprocess.run(tool, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UsageError("fusermount3 is not installed: install the fuse3 package") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "busy" in why.lower():
            raise OssimportError(f"cannot unmount {mountpoint}: it is busy (a process has a file or directory "
                                 "open there; close it and try again)")
        raise OssimportError(f"cannot unmount {mountpoint}: {why}")
    if pid is None:
        return 0
    # the mount process uploads what it still held, then exits: wait for it
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGTERM)
            raise OssimportError(f"the mount process {pid} did not exit within {timeout:.0f}s; sent it SIGTERM")
        time.sleep(0.05)
    return 0


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


if __name__ == "__main__":
    sys.exit(_daemon_main(sys.argv[1:]))
