"""`ossimport mount ADDRESS MOUNTPOINT` and `ossimport umount MOUNTPOINT`.

Everything that can be checked is checked before the mount goes to the background (the address,
/dev/fuse and libfuse 3, the mount point, the keys and the bucket, by listing the root once), so
a mistake is one line and exit 2 in the user's terminal, not a line in a log. Then the process
forks twice and the mount runs detached; the parent waits until the kernel has the mount (or
the mount failed) and exits.

Per mount point, a state directory (XDG_CACHE_HOME or ~/.cache, then ossimport/mount/<hash>)
holds `pid`, `mount.log` and the spool of files being written (unless --cache-dir). `umount`
unmounts like fusermount3 -u (refused while a file is open there) and waits until the mount
process has uploaded what it still held and exited.
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ossimport.errors import OssimportError, StorageError, UsageError

if TYPE_CHECKING:
    from ossimport.address import Location
    from ossimport.mount.fs import MountOptions
    from ossimport.storage.base import Storage

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
    a("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
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
def state_dir(mountpoint: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(base, "ossimport", "mount", digest)


def mounted(mountpoint: str) -> bool:
    """Whether something is mounted at `mountpoint` (a dead FUSE mount too: os.path.ismount
    fails to stat one and says no)."""
    target = os.path.realpath(mountpoint)
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
def run_mount(args: argparse.Namespace, storage_options: Any) -> int:
    from ossimport.storage import open_storage

    loc = mount_location(args.address)
    mountpoint = os.path.abspath(args.mountpoint)
    check_fuse()  # before mfusepy is imported: it loads libfuse when imported
    check_mountpoint(mountpoint)
    from ossimport.mount.fs import MountOptions

    if args.read_threads < 1:
        raise UsageError("--read-threads must be at least 1")
    opts = MountOptions(read_only=args.read_only, attr_ttl=args.attr_ttl, dir_ttl=args.dir_ttl,
                        read_ahead=args.read_ahead, read_memory=args.read_memory,
                        read_threads=args.read_threads)
    # connections: one per read-ahead thread plus the FUSE threads that read and write directly
    st_opts = replace(storage_options, max_pool=args.read_threads + 32)
    storage = open_storage(loc, st_opts)
    try:
        preflight(storage, loc)
    finally:
        storage.close()
    state = state_dir(mountpoint)
    os.makedirs(state, mode=0o700, exist_ok=True)
    spool = os.path.abspath(args.cache_dir) if args.cache_dir else os.path.join(state, "spool")

    def serve(on_ready: Any) -> None:
        _serve(open_storage(loc, st_opts), mountpoint, opts, spool, args.allow_other, on_ready, state)

    if args.foreground:
        serve(None)
        return 0
    return _daemonize(serve, state)


def _serve(storage: Storage, mountpoint: str, opts: MountOptions, spool: str, allow_other: bool,
           on_ready: Any, state: str) -> None:
    from ossimport.mount.fs import FUSE, MountFS

    pid_file = os.path.join(state, "pid")
    with open(pid_file, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    fs = MountFS(storage, spool, opts, on_ready)
    kwargs: dict[str, Any] = {"foreground": True, "fsname": "ossimport", "subtype": "ossimport",
                              "max_threads": 64}
    if allow_other:
        kwargs.update(allow_other=True, default_permissions=True)
    if opts.read_only:
        kwargs["ro"] = True
    try:
        FUSE(fs, mountpoint, raw_fi=True, **kwargs)
    finally:
        storage.close()
        if _read_pid(state) == os.getpid():
            os.unlink(pid_file)


def _daemonize(serve: Any, state: str) -> int:
    """Run `serve` in a detached grandchild; return once it has mounted (0) or failed (2)."""
    log_path = os.path.join(state, "mount.log")
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)  # the middle process exits at once
        with os.fdopen(r, "rb") as pipe:
            said = pipe.read()
        if said == READY:
            return 0
        text = said.decode("utf-8", "replace").strip()
        if not text:
            text = f"the mount process ended before mounting; see {log_path}"
        raise UsageError(text)
    # the middle process: a new session, then away, so the mount is nobody's child
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.chdir("/")
    except OSError as exc:
        os.write(w, f"cannot start the mount process: {exc}".encode())
        os._exit(2)
    told = False

    def ready() -> None:
        nonlocal told
        os.write(w, READY)
        os.close(w)
        told = True

    code = 0
    try:
        serve(ready)
    except BaseException as exc:  # noqa: BLE001 - reported to the waiting parent or the log
        code = 2
        if not told:
            os.write(w, f"cannot mount: {_last_fuse_line(log_path) or exc}".encode())
        print(f"mount ended: {exc}", file=sys.stderr)
    finally:
        if not told:
            os.close(w)
    sys.stderr.flush()
    os._exit(code)


def _last_fuse_line(log_path: str) -> str:
    """libfuse says why a mount failed on stderr (now the log): its last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
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
