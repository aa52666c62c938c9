"""`ossimport [global options] cp|sync SRC DST` — the direct commands (ads-cli style).

Global options may stand before or after the command. Exit codes: 0 everything copied and
verified, 1 some files failed (each named on stderr), 2 bad input (one line saying what to fix),
130 interrupted. Heavy modules are imported only when a command runs, so `--version` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ossimport import __version__
from ossimport.errors import OssimportError, UsageError

if TYPE_CHECKING:
    from ossimport.address import Location
    from ossimport.engine.listing import Filter
    from ossimport.engine.outcome import Outcome
    from ossimport.engine.stats import Stats
    from ossimport.storage.base import Entry, Storage, StorageOptions

log = logging.getLogger("ossimport")
_STDERR_LOCK = threading.Lock()

MiB = 1024 * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, like every other bad input
        raise UsageError(f"{message} (see 'ossimport -h')")


def _size(text: str) -> int:
    """'64m', '1g', '4096' -> bytes (the unit letters of ossimport configs)."""
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB, "t": 1024**4}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64m, 1g)") from None


# every copy thread holds a connection and a buffer of up to a part: more than this exhausts
# memory or the system's thread limit long before it adds speed
MAX_THREADS = 1000
MAX_PROCESSES = 64


def _whole(minimum: int, maximum: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is more than the {maximum} ossimport allows")
        return v

    return parse


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def _timeout(text: str) -> float:
    """Seconds, more than 0: a run without a timeout would wait for a stalled server for good."""
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a timeout must be more than 0 seconds (a stalled server would hang the run "
            "for good); give a large value such as 3600 instead")
    return v


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The options of the ads-cli table (plus ours). On subcommands their defaults are
    suppressed so that a value given before the command is not reset after it."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    a = p.add_argument
    a("--start", "-s", metavar="KEY", default=d(""), help="first key to copy (inclusive)")
    a("--end", "-e", metavar="KEY", default=d(""), help="last key to copy (inclusive)")
    a("--threads", "-p", type=_whole(1, MAX_THREADS), metavar="N", default=d(10), help="concurrent transfers (default 10)")
    a("--processes", type=_whole(0, MAX_PROCESSES), metavar="N", default=d(0),
      help="processes sharing the --threads (0 = cores + 1 up to 4, each with 4+ threads; 1 = one)")
    a("--dryrun", "--dry-run", action="store_true", default=d(False), help="list and count, copy and delete nothing")
    a("--delete-src", "--deleteSrc", dest="delete_src", action="store_true", default=d(False),
      help="delete each source file after it was copied and verified (a move)")
    a("--delete-dst", "--deleteDst", dest="delete_dst", action="store_true", default=d(False),
      help="delete destination files that the source does not have (only when nothing failed)")
    a("--exclude", action="append", metavar="REGEX", default=d([]), help="skip keys matching REGEX (repeatable)")
    a("--include", action="append", metavar="REGEX", default=d([]),
      help="keep keys matching REGEX even if an --exclude matched; alone, keep only matching keys")
    a("--exclude-dir", dest="exclude_dir", action="append", metavar="REGEX", default=d([]),
      help="skip keys under a directory whose name matches REGEX")
    a("--include-dir", dest="include_dir", action="append", metavar="REGEX", default=d([]),
      help="re-admit directories an --exclude-dir matched; alone, keep only keys under matching directories")
    a("--bwlimit", type=_nonneg_float, metavar="MBPS", default=d(0.0), help="bandwidth limit in Mbit/s (0 = unlimited)")
    a("--https", action="store_true", default=d(False), help="talk to object stores over HTTPS (default HTTP)")
    a("--connTimeout", "--conntimeout", "--conn-timeout", dest="conn_timeout", type=_timeout, metavar="S",
      default=d(30.0), help="seconds to establish a connection (default 30)")
    a("--timeout", type=_timeout, metavar="S", default=d(120.0), help="seconds to wait for a response (default 120)")
    a("--anonymous", metavar="SIDE", default=d(None),
      help="no credentials for: 0 or src (source), 1 or dst (destination), both")
    a("--noperms", action="store_true", default=d(False), help="do not copy POSIX permissions")
    a("--recordName", "-rd", dest="record_name", metavar="FILE", default=d(None),
      help="write the keys of skipped symbolic links to FILE")
    a("--copy-links", "-L", dest="copy_links", action="store_true", default=d(False),
      help="follow symbolic links and copy what they point to (default: skip and record them)")
    a("--checksum", "-c", action="store_true", default=d(False),
      help="decide 'changed' and verify copies by content checksum, not size and mtime")
    a("--update", "-u", action="store_true", default=d(False), help="copy only when the source is newer")
    a("--trust-new-hosts", dest="trust_new_hosts", action="store_true", default=d(False),
      help="record the key of an SFTP server not in known_hosts (check its fingerprint) instead of refusing it")
    a("--json", action="store_true", default=d(False), help="print the final summary as one JSON object")
    a("--multipart-threshold", dest="multipart_threshold", type=_size, metavar="SIZE", default=d(16 * MiB),
      help="files at least this large move in parallel parts (default 16m)")
    a("--part-size", dest="part_size", type=_size, metavar="SIZE", default=d(16 * MiB), help="part size (default 16m)")
    a("--verbose", "-v", action="count", default=d(0), help="log every file (-vv: debug)")
    a("--quiet", "-q", action="store_true", default=d(False), help="print errors only")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ossimport", description="Copy and synchronise data between local disks, "
                "S3-compatible stores, Alibaba Cloud OSS and SFTP. Addresses: see README.")
    p.add_argument("--version", "-V", action="version", version=f"ossimport {__version__}")
    _global_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, aliases, text in (("cp", ["copy"], "copy everything from SRC to DST (full copy)"),
                                ("sync", [], "copy what is missing or changed at DST (incremental)")):
        sp = sub.add_parser(name, aliases=aliases, help=text, description=text)
        _global_options(sp, suppress=True)
        if name == "cp":
            sp.add_argument("--info", action="store_true", default=False,
                            help="print count, total, min/max/average size of SRC and copy nothing")
        sp.add_argument("src", metavar="SRC")
        sp.add_argument("dst", metavar="DST")
    text = "compare SRC with DST (size; content with --checksum); exit 0 only when identical"
    vp = sub.add_parser("verify", aliases=["check"], help=text, description=text)
    _global_options(vp, suppress=True)
    vp.add_argument("--missing", metavar="FILE", help="write the keys missing at DST to FILE")
    vp.add_argument("--differ", metavar="FILE", help="write the keys whose size or content differ to FILE")
    vp.add_argument("--extra", metavar="FILE", help="write the keys only at DST to FILE")
    vp.add_argument("--one-way", dest="one_way", action="store_true", default=False,
                    help="only check that every SRC file is at DST: keys only at DST are not differences")
    vp.add_argument("src", metavar="SRC")
    vp.add_argument("dst", metavar="DST")
    from ossimport.mount.command import add_parsers

    add_parsers(sub, _size, _nonneg_float)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "--verbose", "-vv") for a in argv)
    try:
        if argv and argv[0] in ("console", "master", "worker"):
            return _job_front_end(argv)
        if argv and argv[0] == "serve":
            from ossimport import log as logsetup
            from ossimport.service.serve import run_serve

            logsetup.setup(0)
            return run_serve(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given: use 'ossimport cp SRC DST', 'ossimport sync SRC DST' "
                             "or 'ossimport mount ADDRESS MOUNTPOINT'")
        from ossimport import log as logsetup

        logsetup.setup(-1 if args.quiet else args.verbose)
        if args.command in ("verify", "check"):
            return run_verify(args)
        if args.command == "mount":
            from ossimport.mount.command import run_mount

            return run_mount(args, _storage_options(args, "src"))
        if args.command in ("umount", "unmount"):
            from ossimport.mount.command import run_umount

            return run_umount(args)
        return run_copy(args)
    except KeyboardInterrupt:
        print("ossimport: interrupted", file=sys.stderr)
        return 130
    except OssimportError as exc:
        _fail_line(exc, verbose)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        _fail_line(exc, verbose, internal=True)
        return 1


def _job_front_end(argv: list[str]) -> int:
    """The job system's commands live in ossimport.jobs.console; they share this error handling."""
    from ossimport import log as logsetup
    from ossimport.jobs import console

    logsetup.setup(0)
    if argv[0] == "console":
        return console.run_console(argv[1:])
    if argv[0] == "master":
        return console.run_master(argv[1:])
    return console.run_worker(argv[1:])


def _fail_line(exc: BaseException, verbose: bool, internal: bool = False) -> None:
    from ossimport.log import redact

    if verbose:
        import traceback

        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr)
    prefix = "internal error: " if internal else ""
    hint = " (run with -v for details)" if internal and not verbose else ""
    print(f"ossimport: error: {prefix}{one_line(redact(str(exc)))}{hint}", file=sys.stderr)


_CONTROL = {c: c.encode("unicode_escape").decode("ascii")
            for c in [chr(i) for i in (*range(0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]}


def _err_line(text: str) -> None:
    """One whole line to stderr in one write: worker threads report failures concurrently, and
    print() writes the text and its newline separately (two lines could glue together)."""
    line = one_line(text) + "\n"
    with _STDERR_LOCK:
        sys.stderr.write(line)
        sys.stderr.flush()


def one_line(text: str) -> str:
    """`text` with control characters escaped (a key may hold a newline): one message, one line.
    A local name that is not UTF-8 (its bytes held as surrogate escapes) shows those bytes: \\xff."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.translate(str.maketrans(_CONTROL)) if any(c in _CONTROL for c in text) else text


# ---- cp / sync -------------------------------------------------------------------------------------
def _storage_options(args: argparse.Namespace, side: str) -> StorageOptions:
    from ossimport.storage.base import StorageOptions

    anon = (args.anonymous or "").lower()
    if anon and anon not in ("0", "1", "src", "dst", "both", "source", "destination"):
        raise UsageError(f"--anonymous {args.anonymous!r}: use 0/src (source), 1/dst (destination) or both")
    anonymous = anon == "both" or (side == "src" and anon in ("0", "src", "source")) or (
        side == "dst" and anon in ("1", "dst", "destination"))
    return StorageOptions(
        https=args.https,
        connect_timeout=args.conn_timeout,
        read_timeout=args.timeout,
        anonymous=anonymous,
        max_pool=max(args.threads * 2, 10),
        threads=args.threads,
        follow_symlinks=args.copy_links,
        keep_perms=not args.noperms,
        trust_new_hosts=args.trust_new_hosts,
    )


def _locations(args: argparse.Namespace) -> tuple[Location, Location]:
    from ossimport.address import parse_address
    from ossimport.log import register_secret

    src = parse_address(args.src)
    dst = parse_address(args.dst)
    for loc in (src, dst):
        register_secret(loc.access_key, loc.secret_key, loc.token, loc.password)
        if loc.backend == "http" and "?" in loc.path:  # a signed URL: its query values are credentials
            from urllib.parse import parse_qsl, quote

            for _, value in parse_qsl(loc.path.split("?", 1)[1].split("#", 1)[0]):
                if len(value) >= 8:
                    register_secret(value, quote(value, safe=""), quote(value))
    from ossimport.storage import storage_class

    if storage_class(dst.backend).abilities.read_only:
        raise UsageError(f"{dst.flavour} is a read-only source: DST must be a local path, SFTP path or bucket")
    if getattr(args, "delete_src", False) and storage_class(src.backend).abilities.read_only:
        raise UsageError(f"--delete-src: {src.flavour} is a read-only source whose files cannot be removed; "
                         "drop --delete-src")
    if src.backend == "local" and not src.is_dir and os.path.isdir(src.path):
        raise UsageError(f"SRC {src.path!r} is a directory: end SRC and DST with '/' to copy a directory")
    if src.is_dir and not dst.is_dir:
        if dst.backend == "local" and os.path.isdir(dst.path):
            raise UsageError(f"SRC is a directory: end DST with '/' too ({dst.path}/)")
        raise UsageError("SRC is a directory (ends with '/'): DST must end with '/' too")
    _refuse_overlap(src, dst, _filter(args))
    return src, dst


def _filter(args: argparse.Namespace) -> Filter:
    from ossimport.engine.listing import Filter

    return Filter(args.exclude, args.include, args.exclude_dir, args.include_dir)


def _refuse_overlap(src: Location, dst: Location, flt: Filter) -> None:
    """SRC and DST in the same store, one inside the other: a copy would copy its own output
    again, and --delete-dst would delete the source (it is an extra of DST). Allowed only when the
    filter provably keeps the inner one out of both listings, as rclone does."""
    (src_store, a), (dst_store, b) = src.place(), dst.place()
    if src.backend == "http" or src_store != dst_store:
        return
    if not src.is_dir:  # one object: only onto itself
        _, name = src.split_object()
        if a == (b + "/" + name if dst.is_dir else b):
            raise UsageError(f"SRC and DST are the same file ({src.display()}): nothing to copy")
        return
    if a == b:
        raise UsageError(f"SRC and DST are the same directory ({src.display()}): choose another DST")
    if (b + "/").startswith(a + "/"):
        inner = b[len(a) + 1:] + "/"
        what = (f"DST is inside SRC ({dst.display()} in {src.display()}): the copy would copy its own output "
                "again. Choose a DST outside SRC")
    elif (a + "/").startswith(b + "/"):
        inner = a[len(b) + 1:] + "/"
        what = (f"SRC is inside DST ({src.display()} in {dst.display()}): sync would count SRC among DST's files "
                "and --delete-dst would delete it. Choose a DST that does not contain SRC")
    else:
        return
    if not flt.keeps_out(inner):
        import shlex

        raise UsageError(f"{what}, or keep '{inner}' out of both listings with "
                         f"--exclude {shlex.quote('^' + re.escape(inner))}")


def run_copy(args: argparse.Namespace) -> int:
    from ossimport.engine.fanout import auto_processes
    from ossimport.engine.listing import KeyRange
    from ossimport.engine.policy import Policy
    from ossimport.engine.runner import Runner, RunOptions
    from ossimport.engine.stats import Stats
    from ossimport.engine.throttle import TokenBucket, mbit_to_bytes
    from ossimport.engine.transfer import TransferOptions
    from ossimport.progress import Progress
    from ossimport.storage import open_storage

    src_loc, dst_loc = _locations(args)
    single = not src_loc.is_dir
    dst_key = ""
    if single:
        src_loc, src_key = src_loc.split_object()
        if dst_loc.is_dir:
            dst_key = src_key  # cp file dir/ puts the file into the directory
        else:
            dst_loc, dst_key = dst_loc.split_object()
    policy = Policy(mode="cp" if args.command in ("cp", "copy") else "sync", update=args.update,
                    checksum=args.checksum)
    opts = RunOptions(
        policy=policy,
        threads=args.threads,
        processes=args.processes or auto_processes(args.threads),
        dryrun=args.dryrun,
        delete_src=args.delete_src,
        delete_dst=args.delete_dst,
        filter=_filter(args),
        key_range=KeyRange(args.start, args.end),
        transfer=TransferOptions(
            multipart_threshold=args.multipart_threshold,
            part_size=args.part_size,
            # parts held in memory at once: part_threads x part size (default 8 x 16 MiB)
            part_threads=max(2, min(args.threads, 8)),
            checksum=args.checksum,
            keep_perms=not args.noperms,
            bucket=TokenBucket(mbit_to_bytes(args.bwlimit)) if args.bwlimit > 0 else None,
        ),
    )
    if args.record_name:
        _check_writable(args.record_name, "--recordName")
    src_opts, dst_opts = _storage_options(args, "src"), _storage_options(args, "dst")
    src = open_storage(src_loc, src_opts)
    dst = open_storage(dst_loc, dst_opts)
    try:
        if src_loc.backend == "local" and not os.path.isdir(src_loc.path):
            raise UsageError(f"source directory {src_loc.path!r} does not exist")
        if getattr(args, "info", False):
            return _info(src, opts, args.json)
        stats = Stats()
        runner = Runner(src, dst, opts, stats, listener=_listener(args))
        if not single:
            runner.start_helpers()  # forks: before the progress thread starts
        try:
            with _stopped_by_ctrl_c(runner), Progress(stats, enabled=not args.quiet and not args.json):
                if single:
                    runner.run_items(_single_item(src, dst, src_key, dst_key, stats, policy.needs_destination))
                else:
                    runner.run()
        except KeyboardInterrupt:  # a second Ctrl-C: leave at once
            runner.stop()
        if runner.cancelled:
            _report(args, stats, src_opts)
            print("ossimport: interrupted; run the same command again to resume", file=sys.stderr)
            return 130
        _report(args, stats, src_opts)
        return 0 if stats.failed == 0 else 1
    finally:
        src.close()
        dst.close()


@contextlib.contextmanager
def _stopped_by_ctrl_c(runner: Any) -> Iterator[None]:
    """Ctrl-C (SIGINT) stops the run through its cancel token: the run returns within a moment,
    whatever the backlog or bandwidth limit, and the caller reports and exits 130. A second
    Ctrl-C raises KeyboardInterrupt as usual, in case something does not return."""

    def on_sigint(signum: int, frame: Any) -> None:
        if runner.cancelled:
            raise KeyboardInterrupt
        runner.stop()

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (an embedding program)
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_writable(path: str, option: str) -> None:
    """Refuse now a file the run could only fail to write at its end, after all the copying."""
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path!r}: cannot write it ({e.strerror or e}); give a file in an existing, "
                         "writable directory") from None


def _single_item(src: Storage, dst: Storage, src_key: str, dst_key: str, stats: Stats,
                 needs_dst: bool) -> list[tuple[Entry, Entry | None, str]]:
    from ossimport.errors import NotFound

    try:
        entry = src.head(src_key)
    except NotFound:
        raise UsageError(f"source object {src.describe()}{src_key} does not exist") from None
    stats.add(found=1, found_bytes=entry.size)
    current = None
    if needs_dst:
        try:
            current = dst.head(dst_key)
        except NotFound:
            current = None
    return [(entry, current, dst_key)]


def _listener(args: argparse.Namespace) -> Any:
    from ossimport.engine.outcome import Kind

    def on(o: Outcome) -> None:
        if o.kind is Kind.FAILED:
            from ossimport.log import redact

            where = f" {o.key}" if o.key else ""
            _err_line(redact(f"FAILED{where}: {o.code}: {o.message}"))
        elif args.verbose:
            verb = _WOULD.get(o.kind.value, "would " + o.kind.value) if args.dryrun else o.kind.value
            log.info("%s %s", verb, o.key)

    return on


# what a dry run says instead of the event it did not carry out
_WOULD = {"copied": "would copy", "deleted": "would delete", "deleted-source": "would delete source",
          "skipped": "would skip"}


def _report(args: argparse.Namespace, stats: Stats, src_opts: StorageOptions) -> None:
    from ossimport.progress import human_bytes

    if args.record_name:
        with open(args.record_name, "w", encoding="utf-8") as f:
            for key in src_opts.skipped_links:
                f.write(key + "\n")
    elif src_opts.skipped_links and not args.quiet:
        print(f"skipped {len(src_opts.skipped_links)} symbolic links (use -L to follow them, "
              "--recordName FILE to list them)", file=sys.stderr)
    if stats.not_tried:
        # not quiet-able: it explains an exit code and failures no FAILED line named
        first = next((f for f in stats.failures if not f.message.startswith("not tried")), None)
        code = first.code if first else "the error above"
        print(f"ossimport: {stats.not_tried} more files were not tried (or failed the same way while in flight): "
              f"every request would fail with {code} like the one above; fix that and run the command again",
              file=sys.stderr)
    summary = stats.summary()
    if args.json:
        summary["dryrun"] = bool(args.dryrun)
        print(json.dumps(summary))
        return
    if args.quiet:
        return
    secs = stats.elapsed
    dry = " (dry run: nothing written)" if args.dryrun else ""
    deleted = f"would delete {stats.would_delete}" if args.dryrun else f"deleted {stats.deleted}"
    print(f"found {stats.found}, excluded {stats.excluded}, skipped {stats.skipped}, copied {stats.copied} "
          f"({human_bytes(stats.copied_bytes)}), extra {stats.extra}, {deleted}, "
          f"failed {stats.failed} in {secs:.2f}s ({stats.copied / secs:.1f} files/s, "
          f"{human_bytes(stats.copied_bytes / secs)}/s){dry}")


def _info(src: Storage, opts: Any, as_json: bool) -> int:
    from ossimport.progress import human_bytes

    count = total = 0
    smallest: int | None = None
    largest = 0
    kr, flt = opts.key_range, opts.filter
    from ossimport.engine.listing import ranged

    for e in ranged(src.list(start_after=kr.start_after()), kr):
        if flt.active and not flt.admits(e.key):
            continue
        count += 1
        total += e.size
        largest = max(largest, e.size)
        smallest = e.size if smallest is None else min(smallest, e.size)
    avg = total / count if count else 0
    if as_json:
        print(json.dumps({"count": count, "total_bytes": total, "min": smallest or 0, "max": largest,
                          "avg": round(avg)}))
        return 0
    print(f"count {count}, total {human_bytes(total)} ({total} bytes), min {smallest or 0}, max {largest}, "
          f"avg {avg:.0f} bytes")
    return 0


# ---- verify ----------------------------------------------------------------------------------------
class _KeyLists:
    """The keys verify finds, counted and written to the files the user asked for."""

    CODES = {"MISSING_AT_DESTINATION": "missing", "SIZE_NOT_MATCH": "differ", "CHECKSUM_NOT_MATCH": "differ"}

    def __init__(self, args: argparse.Namespace) -> None:
        import threading

        self.counts = {"missing": 0, "differ": 0, "extra": 0, "errors": 0}
        self.files = {kind: open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
                      for kind in ("missing", "differ", "extra") if (path := getattr(args, kind))}
        self.quiet = args.quiet
        self.one_way = args.one_way
        self._lock = threading.Lock()

    def on(self, o: Outcome) -> None:
        from ossimport.engine.outcome import Kind

        if o.kind is Kind.EXTRA:
            if self.one_way:
                return
            kind = "extra"
        elif o.failed:
            kind = self.CODES.get(o.code, "errors")
        else:
            return
        with self._lock:
            self.counts[kind] += 1
            if kind in self.files:
                self.files[kind].write(o.key + "\n")
        if not self.quiet and o.kind is not Kind.NOT_TRIED:
            from ossimport.log import redact

            why = f": {o.code}: {o.message}" if kind in ("differ", "errors") else ""
            _err_line(redact(f"{kind.upper()} {o.key}{why}"))

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def run_verify(args: argparse.Namespace) -> int:
    from ossimport.engine.fanout import auto_processes
    from ossimport.engine.listing import KeyRange
    from ossimport.engine.runner import Runner, RunOptions
    from ossimport.engine.stats import Stats
    from ossimport.engine.transfer import TransferOptions
    from ossimport.storage import open_storage

    src_loc, dst_loc = _locations(args)
    if not src_loc.is_dir:
        raise UsageError("verify compares two directories: end SRC and DST with '/'")
    opts = RunOptions(
        threads=args.threads,
        processes=args.processes or auto_processes(args.threads),
        verify_only=True,
        verify_checksum=args.checksum,
        filter=_filter(args),
        key_range=KeyRange(args.start, args.end),
        transfer=TransferOptions(checksum=args.checksum),
    )
    src_opts, dst_opts = _storage_options(args, "src"), _storage_options(args, "dst")
    src, dst = open_storage(src_loc, src_opts), open_storage(dst_loc, dst_opts)
    lists = _KeyLists(args)
    try:
        if src_loc.backend == "local" and not os.path.isdir(src_loc.path):
            raise UsageError(f"source directory {src_loc.path!r} does not exist")
        stats = Stats()
        runner = Runner(src, dst, opts, stats, listener=lists.on)
        with _stopped_by_ctrl_c(runner):
            runner.run()
    finally:
        lists.close()
        src.close()
        dst.close()
    if runner.cancelled:
        print("ossimport: interrupted", file=sys.stderr)
        return 130
    c = lists.counts
    # a listing that failed outright (missing bucket, unreachable endpoint) is counted in stats but
    # reaches no listener: it must not read as "identical"
    c["errors"] += max(0, stats.failed - (c["missing"] + c["differ"] + c["errors"]))
    identical = stats.skipped
    if args.json:
        print(json.dumps({"found": stats.found, "excluded": stats.excluded, "identical": identical,
                          "missing": c["missing"], "differ": c["differ"], "extra": c["extra"],
                          "errors": c["errors"], "checksum": bool(args.checksum),
                          "seconds": round(stats.elapsed, 3)}))
    elif not args.quiet:
        how = "size and content checksum" if args.checksum else "size"
        print(f"compared {stats.found - stats.excluded} files by {how}: {identical} identical, "
              f"{c['missing']} missing at destination, {c['differ']} differ, {c['extra']} extra at destination, "
              f"{c['errors']} errors")
    return 0 if not (c["missing"] or c["differ"] or c["extra"] or c["errors"]) else 1
