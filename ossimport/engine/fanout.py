"""Helper processes for one run: where the GIL binds, more processes copy.

Thousands of small files keep a Python process busy with per-file work (a request, a file
created, a checksum) that only one thread at a time can do. Measured on 2 cores (2,000 × 4 KiB,
S3 → local, 16 threads): one process 0.97 s, two processes of 8 threads 0.72 s.

The parent lists and merges as always, and its queue of items feeds its own copy threads plus one
forwarder thread per helper. A helper is forked before any thread is started, asks for a batch of
items whenever it runs short, copies them with a Runner of its own over fresh Storage instances
(sockets and SSH sessions are never shared across a fork), and every few milliseconds sends back
the outcomes of what it finished and the change in its counters, so that progress, FAILED lines,
job audit records and the summary are the same as with one process. A helper ignores Ctrl-C: the
parent decides, and when its run is stopped it sends each helper SIGTERM, which stops the
helper's run the same way (nothing new starts, copies in hand are abandoned). If a helper dies,
the items it held are copied again by the parent; if the parent dies, the helper finds its pipe
closed and exits.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe
from typing import Any

from ossimport.engine.cancel import CancelToken
from ossimport.engine.outcome import TERMINAL, Listener, Outcome
from ossimport.engine.stats import Stats
from ossimport.storage.base import Entry, Storage

log = logging.getLogger("ossimport")

BATCH = 32  # items per hand-out: enough to amortise a round trip, few enough to balance the load
FLUSH_SECONDS = 0.02  # how often a helper reports (progress and FAILED lines stay live)
# counters a helper changes (listing counters such as found/extra stay with the parent)
COUNTERS = ("skipped", "copied", "copied_bytes", "deleted", "would_delete", "failed", "failed_bytes", "not_tried",
            "bytes_moved")

Item = tuple[Entry, "Entry | None", str]


def auto_processes(threads: int) -> int:
    """One process per core and one more (up to 4), each with at least 4 of the run's threads.
    The one more because a process also waits on its own GIL hand-offs: 2,000 small downloads
    on 2 cores took 1.24 s with 2 processes and 1.11 s with 3 (medians of 5)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores + 1, 4, threads // 4))


def split(total: int, parts: int) -> list[int]:
    """`total` threads over `parts` processes, the parent first; each gets at least one."""
    base, extra = divmod(max(total, parts), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class Helper:
    pid: int
    conn: Connection
    held: dict[str, Item] = field(default_factory=dict)  # handed out, not yet reported, by key
    # a pidfd (Linux): signals sent through it cannot reach another process that reuses the pid
    # once the helper was reaped
    pidfd: int | None = None
    reaped: bool = False


def start(count: int, src: Storage, dst: Storage, threads: list[int],
          make_runner: Callable[[Storage, Storage, Stats, int, Listener], Any],
          ) -> list[Helper]:
    """Fork `count` helpers. Call before the parent starts any thread: a fork copies only the
    calling thread, and a lock held by another one would stay locked in the child for good."""
    helpers: list[Helper] = []
    for i in range(count):
        parent_end, child_end = Pipe(duplex=True)
        pid = os.fork()
        if pid == 0:  # the helper: never returns into the parent's code
            code = 1
            try:
                parent_end.close()
                for h in helpers:
                    h.conn.close()
                code = _helper_main(child_end, src, dst, threads[i], make_runner)
            except BaseException:  # noqa: BLE001 - a helper must end here, whatever happened
                log.debug("copy helper failed", exc_info=True)
            finally:
                os._exit(code)
        child_end.close()
        helpers.append(Helper(pid, parent_end, pidfd=_pidfd(pid)))
    return helpers


# ---- the helper's side ----------------------------------------------------------------------------
def _helper_main(conn: Connection, src: Storage, dst: Storage, threads: int,
                 make_runner: Callable[..., Any]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    send_lock = threading.Lock()
    outcomes: list[Outcome] = []
    outcomes_lock = threading.Lock()
    stats = Stats()
    sent = dict.fromkeys(COUNTERS, 0)
    failures_sent = 0

    def listener(outcome: Outcome) -> None:
        with outcomes_lock:
            outcomes.append(outcome)

    runner: Any = None
    parent_gone = threading.Event()
    stopped = CancelToken()

    def on_term(signum: int, frame: Any) -> None:  # the parent's run was stopped
        stopped.cancel()
        if runner is not None:
            runner.stop()

    signal.signal(signal.SIGTERM, on_term)

    def send(message: tuple[Any, ...]) -> None:
        if parent_gone.is_set():
            return
        try:
            with send_lock:
                conn.send(message)
        except OSError:
            gone()

    def gone() -> None:
        # the parent exited (Ctrl-C, a crash): finish the copies in flight, start no other
        parent_gone.set()
        if runner is not None:
            runner.stop()

    def report() -> None:
        nonlocal failures_sent
        with outcomes_lock:
            batch = outcomes[:]
            outcomes.clear()
        delta = {}
        for name in COUNTERS:
            now = getattr(stats, name)
            if now != sent[name]:
                delta[name] = now - sent[name]
                sent[name] = now
        new_failures = stats.failures[failures_sent:]
        failures_sent += len(new_failures)
        if batch or delta or new_failures:
            send(("report", batch, delta, [(f.key, f.code, f.message) for f in new_failures]))

    stop = threading.Event()

    def reporter() -> None:
        while not stop.wait(FLUSH_SECONDS):
            report()

    def items() -> Iterator[Item]:
        while not parent_gone.is_set():
            send(("more",))
            try:
                answer = conn.recv()
            except (EOFError, OSError):
                gone()
                return
            if answer is None:
                return
            batch, reached = answer
            if reached:
                runner.reached()  # the parent's listing (or copies) reached the stores
            yield from batch

    my_src, my_dst = src.reopen(), dst.reopen()
    runner = make_runner(my_src, my_dst, stats, threads, listener)
    if stopped.cancelled:  # SIGTERM came before the runner existed
        runner.stop()
    thread = threading.Thread(target=reporter, name="report", daemon=True)
    thread.start()
    try:
        runner.run_items(items())
    finally:
        stop.set()
        thread.join()
        report()
        send(("done",))
        for st in (my_src, my_dst):
            st.close()
    return 0


# ---- the parent's side ----------------------------------------------------------------------------
@dataclass
class Parent:
    """What a forwarder needs of the parent's run."""

    queue: queue.SimpleQueue[object]  # the run's items, ended by one `done` marker per consumer
    done: object
    stats: Stats
    emit: Listener
    outcome: Callable[[Outcome], Outcome]  # a helper's outcome as the run reports it
    cancel: CancelToken
    handle: Callable[[Item], None]  # handle one item in this process
    work: Callable[[], None]  # serve the queue in this process up to a done marker
    reached: Callable[[], bool]  # the stores answered this run: a refused connection is an outage
    halted: Callable[[], bool]  # a failure every request would repeat stopped the run


def forward(helper: Helper, parent: Parent) -> None:
    """The parent's thread for one helper: hands it items from the queue when it asks (with
    what the run knows of the stores), applies its reports (each outcome as `parent.outcome`
    says it is to be reported), and takes over its items (and then its share of the queue) if
    it dies. Once the run is stopped or halted, the parent serves the queue itself (a halted run
    fails the rest without a request each). Consumes exactly one `done` marker, like a copy
    thread."""
    q, stopped = parent.queue, parent.cancel
    got_done = False
    handed = 0
    try:
        while True:
            message = helper.conn.recv()
            if message[0] == "more":
                batch: list[Item] = []
                while not got_done and not stopped.cancelled and not parent.halted() and len(batch) < BATCH:
                    try:
                        item = q.get() if not batch else q.get_nowait()
                    except queue.Empty:
                        break
                    if item is parent.done:
                        got_done = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
                for item in batch:
                    helper.held[item[0].key] = item
                handed += len(batch)
                helper.conn.send((batch, parent.reached()) if batch else None)
            elif message[0] == "report":
                _apply(helper, message[1], message[2], message[3], parent.stats, parent.emit, parent.outcome)
            elif message[0] == "done":
                log.debug("copy process %d handled %d files", helper.pid, handed)
                break
    except (EOFError, OSError):
        log.warning("a copy process exited unexpectedly; its %d files are copied by the main process",
                    len(helper.held))
        for item in list(helper.held.values()):
            parent.handle(item)
        helper.held.clear()
    finally:
        helper.conn.close()
        try:
            os.waitpid(helper.pid, 0)
        except ChildProcessError:
            pass
        helper.reaped = True
    if not got_done:
        # a helper that died, was stopped or halted: serve the queue in its place up to the done
        # marker (after a stop that only skips, after a halt it fails without requests), so every
        # copy thread still gets its own marker
        parent.work()


def _apply(helper: Helper, outcomes: list[Outcome], delta: dict[str, int],
           failures: list[tuple[str, str, str]], stats: Stats,
           emit: Listener, outcome: Callable[[Outcome], Outcome]) -> None:
    stats.merge(delta, failures)
    for o in outcomes:
        if o.kind in TERMINAL:
            helper.held.pop(o.key, None)
        emit(outcome(o))


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except OSError:
        return None


def terminate(helper: Helper) -> None:
    """Send SIGTERM (which stops the helper's run, see _helper_main), never to a stranger."""
    try:
        if helper.pidfd is not None:
            signal.pidfd_send_signal(helper.pidfd, signal.SIGTERM)
        elif not helper.reaped:
            os.kill(helper.pid, signal.SIGTERM)
    except OSError:  # gone already
        pass


def release(helpers: list[Helper]) -> None:
    """Close the helpers' pidfds once nothing will signal them."""
    for h in helpers:
        if h.pidfd is not None:
            os.close(h.pidfd)
            h.pidfd = None


def stop_all(helpers: list[Helper]) -> None:
    """Last resort when the parent fails before forwarding: end the helpers."""
    for h in helpers:
        try:
            h.conn.close()
            os.kill(h.pid, signal.SIGTERM)
            os.waitpid(h.pid, 0)
        except (OSError, ChildProcessError):
            pass


