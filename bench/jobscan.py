"""How the master's task cutting scales: time per task cut at the start of a scan and near its end.

    python bench/jobscan.py [--files 100000] [--per-task 1] [--window 1000]

Creates FILES empty files in a temp directory, then runs one scan pass (the master's Scanner, in
this process, local -> local, taskObjectCountLimit PER_TASK) and prints the median and mean ms per
task cut over the first WINDOW tasks and the last WINDOW tasks, the whole scan's time and the
process's peak RSS. With O(1) work per cut the two windows agree; a scan that looks at every task
already written per cut would show the last window many times slower than the first.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ossimport.address import parse_address  # noqa: E402
from ossimport.jobs.execute import JobSpec  # noqa: E402
from ossimport.jobs.scanner import JobPlan, Scanner  # noqa: E402
from ossimport.jobs.store import WorkDir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--per-task", type=int, default=1)
    ap.add_argument("--window", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ossimport-jobscan-") as tmp:
        src = Path(tmp) / "src"
        for d in range(args.files // 1000 + 1):  # os calls, not pathlib: its interning would count
            os.makedirs(f"{src}/d{d:04d}")
        for i in range(args.files):
            os.close(os.open(f"{src}/d{i // 1000:04d}/f{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644))
        wd = WorkDir(Path(tmp) / "work")
        wd.create()
        wd.submit("bench", "")
        job = wd.take("bench")
        spec = JobSpec("bench", parse_address(f"{src}/"), parse_address(f"{tmp}/dst/"))
        stamps: list[float] = []
        start = time.perf_counter()
        Scanner(job, JobPlan(spec, count_limit=args.per_task), on_task=lambda _: stamps.append(time.perf_counter()),
                stopped=lambda: False, log=lambda _: None).run()
        total = time.perf_counter() - start
    gaps = [(b - a) * 1000 for a, b in zip([start, *stamps], stamps, strict=False)]
    w = min(args.window, len(gaps) // 2 or 1)
    first, last = gaps[:w], gaps[-w:]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(stamps)} tasks from {args.files} files in {total:.1f} s; peak RSS {rss:.0f} MiB")
    print(f"first {w} cuts: median {statistics.median(first):.3f} ms, mean {statistics.mean(first):.3f} ms")
    print(f"last {w} cuts:  median {statistics.median(last):.3f} ms, mean {statistics.mean(last):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
