"""Engine behaviour: merge, policy, retries, throttling, and a source changing mid-copy."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from helpers import run_cli, run_json, write_tree

from ossimport.engine.listing import KeyRange, checked_order, merge, ranged
from ossimport.engine.policy import Action, Policy
from ossimport.engine.throttle import TokenBucket
from ossimport.errors import StorageError
from ossimport.retry import with_retries
from ossimport.storage.base import Entry


def E(key: str, size: int = 1, mtime: float = 100.0) -> Entry:
    return Entry(key, size, mtime)


def test_merge_pairs_keys_of_both_sides() -> None:
    src = [E("a"), E("b"), E("d")]
    dst = [E("b"), E("c"), E("d"), E("e")]
    got = [(s.key if s else None, d.key if d else None) for s, d in merge(src, dst)]
    assert got == [("a", None), ("b", "b"), (None, "c"), ("d", "d"), (None, "e")]


def test_merge_is_lazy() -> None:
    def endless(prefix: str):  # type: ignore[no-untyped-def]
        i = 0
        while True:
            yield E(f"{prefix}{i:09d}")
            i += 1

    pairs = merge(endless("k"), endless("k"))
    assert [next(pairs)[0].key for _ in range(3)] == ["k000000000", "k000000001", "k000000002"]  # type: ignore[union-attr]


def test_unsorted_listing_is_refused() -> None:
    with pytest.raises(StorageError, match="not in ascending key order"):
        list(checked_order([E("b"), E("a")], "somewhere"))


def test_key_range_is_inclusive_and_stops_early() -> None:
    consumed = []

    def listing():  # type: ignore[no-untyped-def]
        for k in ["a", "aa", "b", "c", "ca", "d", "e"]:
            consumed.append(k)
            yield E(k)

    kr = KeyRange("aa", "c")
    assert [e.key for e in ranged(listing(), kr)] == ["aa", "b", "c"]
    assert consumed[-1] == "ca", "listing stops at the first key past --end"


@pytest.mark.parametrize(
    ("policy", "src", "dst", "action"),
    [
        (Policy("sync"), E("k", 1, 100), None, Action.COPY),
        (Policy("sync"), E("k", 1, 100), E("k", 1, 100.9), Action.SKIP),
        (Policy("sync"), E("k", 1, 100.5), E("k", 1, 100), Action.SKIP),  # same second
        (Policy("sync"), E("k", 1, 102), E("k", 1, 100), Action.COPY),  # newer source
        (Policy("sync"), E("k", 2, 100), E("k", 1, 200), Action.COPY),  # size differs
        (Policy("sync", checksum=True), E("k", 1, 300), E("k", 1, 100), Action.COMPARE),
        (Policy("cp"), E("k", 1, 100), E("k", 1, 100), Action.COPY),
        (Policy("sync", update=True), E("k", 5, 100), E("k", 1, 200), Action.SKIP),
        (Policy("sync", update=True), E("k", 5, 100), E("k", 1, 100), Action.COPY),
        (Policy.from_conflict("SKIP_THE_FILE"), E("k", 1, 900), E("k", 1, 100), Action.SKIP),
        # "skips the file with the same name": also when the sizes differ
        (Policy.from_conflict("SKIP_THE_FILE"), E("k", 11, 900), E("k", 3, 100), Action.SKIP),
        (Policy.from_conflict("KEEP_LATEST"), E("k", 1, 900), E("k", 1, 100), Action.COPY),
        (Policy.from_conflict("OVERWRITE_EXISTING"), E("k", 1, 1), E("k", 1, 100), Action.COPY),
        (Policy("sync"), None, E("k"), Action.EXTRA),
    ],
)
def test_policy(policy: Policy, src: Entry | None, dst: Entry | None, action: Action) -> None:
    assert policy.decide(src, dst) is action


def test_retries_only_retryable_errors_with_growing_delays() -> None:
    delays: list[float] = []
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StorageError("slow down", code="SlowDown", retryable=True)
        return "ok"

    assert with_retries(flaky, attempts=4, sleep=delays.append) == "ok"
    assert len(calls) == 3 and all(d >= 1.0 for d in delays), "SlowDown waits at least a second"

    def denied() -> None:
        calls.append(1)
        raise StorageError("denied", code="AccessDenied")

    calls.clear()
    with pytest.raises(StorageError):
        with_retries(denied, attempts=4, sleep=delays.append)
    assert len(calls) == 1


def test_token_bucket_waits_exactly_for_the_debt() -> None:
    """On a clock of its own (sleeping advances it), the bucket lets the initial burst through
    and then exactly `rate` bytes per second: 4 MB at 2 MB/s after a 0.5 MB burst is 1.75 s."""
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(2_000_000, 500_000, clock=lambda: now[0], sleep=sleep)
    for _ in range(40):
        bucket.consume(100_000)
    assert now[0] == pytest.approx(1.75)
    assert slept and max(slept) <= 0.05 + 1e-9  # never more than one request's worth at a time
    bucket.consume(600_000)  # larger than the burst: served in burst-sized slices
    assert now[0] == pytest.approx(2.05)


def test_a_cancel_ends_a_token_bucket_wait() -> None:
    """At 1 kB/s a 1 MB request is a quarter of an hour of waiting; a stopped run ends it."""
    from ossimport.engine.cancel import Cancelled, CancelToken

    bucket, cancel = TokenBucket(1000), CancelToken()
    waiter_done = threading.Event()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            bucket.consume(1_000_000, cancel)
        except Cancelled as exc:
            outcome.append(exc)
        waiter_done.set()

    threading.Thread(target=wait, daemon=True).start()
    cancel.cancel()
    assert waiter_done.wait(30) and len(outcome) == 1


def test_token_bucket_holds_the_rate_across_threads() -> None:
    """4 threads share one limit: together they cannot move 4 MB at 2 MB/s in less than 1.75 s
    (a lower bound only: a busy machine may take longer, never shorter)."""
    bucket = TokenBucket(2_000_000, 500_000)
    start = time.monotonic()

    def take() -> None:
        for _ in range(10):
            bucket.consume(100_000)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.monotonic() - start >= 1.75 * 0.99


def test_source_growing_during_copy_is_never_recorded_as_copied(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"growing.log": os.urandom(3_000_000)})
    target = src / "growing.log"
    stop = threading.Event()

    def append_once_copy_started() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            if dst.exists() and any(dst.iterdir()):  # the temp file appeared: the copy is under way
                with open(target, "ab") as f:
                    f.write(b"more data")
                return
            time.sleep(0.01)

    t = threading.Thread(target=append_once_copy_started)
    t.start()
    proc = run_cli("--json", "--bwlimit", "8", "cp", f"{src}/", f"{dst}/")
    stop.set()
    t.join(10)
    assert proc.returncode == 1, proc.stderr
    assert "SIZE_NOT_MATCH" in proc.stderr
    assert not (dst / "growing.log").exists()
    assert not [p for p in dst.rglob("*") if p.is_file()], "no temp file is left behind"
    out = run_json("sync", f"{src}/", f"{dst}/")
    assert out["copied"] == 1
    assert (dst / "growing.log").read_bytes() == target.read_bytes()
