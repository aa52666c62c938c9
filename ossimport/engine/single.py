"""One file, copied on request: what a streaming dataflow subtask does, wherever it runs (a job
worker, or the service itself when no worker is connected).

`copy_single` heads the source, checks the request's Condition, applies the conflict policy and
copies through the engine's one copy path (`Runner`), with the destination wrapped in `Arriving`
so progress and the CRC-64 of the bytes that arrived are known without a second read. The answer
is one typed `SingleResult`; it travels as a dict between processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ossimport.engine.arrival import Arrival, Arriving
from ossimport.engine.outcome import Kind, Outcome
from ossimport.engine.policy import Policy
from ossimport.engine.runner import Runner, RunOptions
from ossimport.engine.stats import Stats
from ossimport.engine.throttle import TokenBucket
from ossimport.engine.transfer import TransferOptions
from ossimport.errors import NotFound, OssimportError
from ossimport.storage.base import Entry, Storage

MiB = 1024 * 1024
# parts small enough that Progress moves while a large file travels, large enough to stay cheap
TRANSFER = dict(multipart_threshold=16 * MiB, part_size=8 * MiB, part_threads=4)


@dataclass(frozen=True)
class SingleRequest:
    src_key: str
    dst_key: str
    conflict: str  # OVERWRITE_EXISTING | SKIP_THE_FILE | KEEP_LATEST
    src_path: str  # as the user wrote it, for messages
    cond_size: int | None = None
    cond_mtime: int | None = None  # ns
    again: bool = False  # an earlier attempt may have left a temporary file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SingleRequest:
        return cls(**d)


@dataclass(frozen=True)
class SingleResult:
    status: str  # COMPLETE | FAILED | CANCELED
    error: str = ""
    file_mtime: int | None = None  # ns
    file_size: int | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    actual_bytes: int = 0
    average_speed: int = 0
    checksum: str = ""  # crc64:<decimal> of the bytes that arrived

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SingleResult:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def row(self) -> dict[str, Any]:
        """The subtask columns this result sets (the file's details only once known)."""
        values = {k: v for k, v in self.to_dict().items() if k != "status"}
        if self.file_size is None:
            for k in ("file_mtime", "file_size", "bytes_total"):
                values.pop(k)
        if self.status == "COMPLETE":
            values["progress"] = 10000
        return values


def copy_single(src: Storage, dst: Storage, req: SingleRequest, arrival: Arrival,
                on_source: Callable[[Entry], None] | None = None, bucket: TokenBucket | None = None) -> SingleResult:
    """Copy one file; `on_source(entry)` is told the source's size before any byte moves;
    `bucket` is the bandwidth limit of the process that copies (a worker's --max-throughput)."""
    try:
        entry = src.head(req.src_key)
    except NotFound:
        return SingleResult("FAILED", f"SOURCE_NOT_FOUND: {req.src_path} does not exist at the source")
    except OssimportError as exc:
        return SingleResult("FAILED", f"{exc.code}: {exc}")
    detail = dict(file_mtime=round(entry.mtime * 1e6) * 1000, file_size=entry.size, bytes_total=entry.size)
    if on_source is not None:
        on_source(entry)
    problem = condition_problem(req, entry)
    if problem:
        return SingleResult("FAILED", f"CONDITION_NOT_MET: {problem}", **detail)
    policy = Policy.from_conflict(req.conflict)
    existing: Entry | None = None
    if policy.needs_destination:
        try:
            existing = dst.head(req.dst_key)
        except NotFound:
            existing = None
    if req.again:  # an earlier run was killed mid-copy
        remove_partial(dst, req.dst_key)
    outcomes: list[Outcome] = []
    opts = RunOptions(policy=policy, threads=1, transfer=TransferOptions(**TRANSFER, bucket=bucket))  # type: ignore[arg-type]
    runner = Runner(src, Arriving(dst, arrival), opts, Stats(), listener=outcomes.append)  # type: ignore[arg-type]
    started = time.monotonic()
    runner.run_items([(entry, existing, req.dst_key)])
    seconds = max(time.monotonic() - started, 1e-3)
    last = outcomes[-1] if outcomes else Outcome(Kind.FAILED, req.dst_key, code="Internal", message="no outcome")
    crc, arrived = arrival.checksum()
    if arrival.cancel.is_set() and last.kind is not Kind.COPIED:
        return SingleResult("CANCELED", "canceled", **detail)
    if last.kind is Kind.COPIED:
        return SingleResult("COMPLETE", "", bytes_done=entry.size, actual_bytes=arrived,
                            average_speed=int(arrived / seconds),
                            checksum=f"crc64:{crc}" if arrived == entry.size else "", **detail)
    if last.kind is Kind.SKIPPED:
        return SingleResult("COMPLETE", "", bytes_done=entry.size, **detail)
    return SingleResult("FAILED", f"{last.code}: {last.message}", **detail)


def remove_partial(dst: Storage, key: str) -> None:
    """What a copy to `key` killed midway left: its temporary file (object stores drop unfinished
    multipart uploads of the key in the next transfer itself)."""
    if not dst.abilities.multipart:
        dst.remove_stale_temps([key])


def condition_problem(req: SingleRequest, entry: Entry) -> str:
    """Why the source does not meet the request's Condition ('' when it does or there is none).
    ModifyTime is compared to the second: object stores keep no finer mtime."""
    if req.cond_size is not None and req.cond_size != entry.size:
        return f"the source has {entry.size} bytes, Condition.Size is {req.cond_size}"
    if req.cond_mtime is not None and req.cond_mtime // 10**9 != int(entry.mtime):
        return (f"the source was modified at {int(entry.mtime * 1e9)} ns, Condition.ModifyTime is "
                f"{req.cond_mtime}")
    return ""
