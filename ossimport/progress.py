"""Progress display for the direct commands: a live bar on a terminal, plain lines otherwise.

Shows what ads-cli users know: files listed, files identical (sync), percent, files/s, bytes/s.
It only reads `Stats`; the engine never waits for it."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from ossimport.engine.stats import Stats


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def status_line(stats: Stats) -> str:
    done = stats.copied + stats.skipped + stats.failed + stats.excluded
    files_s, bytes_s = stats.rates()
    pct = f"{100 * done / stats.found:.1f}%" if stats.found else "0.0%"
    listing = "" if stats.listing_done else " (listing)"
    return (f"listed {stats.found}{listing}, identical {stats.skipped}, copied {stats.copied}, "
            f"failed {stats.failed}, {pct}, {files_s:.1f} files/s, {human_bytes(bytes_s)}/s")


class Progress:
    """Context manager that shows progress until the run ends."""

    def __init__(self, stats: Stats, *, enabled: bool, stream: TextIO = sys.stderr, interval: float = 5.0) -> None:
        self.stats = stats
        self.enabled = enabled
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        if self.stream.isatty():
            self._start_bar()
        else:
            self._thread = threading.Thread(target=self._lines, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def _lines(self) -> None:
        while not self._stop.wait(self.interval):
            print(status_line(self.stats), file=self.stream, flush=True)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(self._render(), console=Console(file=self.stream), refresh_per_second=4,
                          transient=False, get_renderable=self._render)
        self._live.start()

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = self.stats
        done = s.copied + s.skipped + s.failed + s.excluded
        grid = Table.grid(padding=(0, 1))
        grid.add_row(ProgressBar(total=max(s.found, 1), completed=done, width=30), status_line(s))
        return grid
