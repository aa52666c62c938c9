"""Running one task: the glue between a job's settings and the engine.

A `JobSpec` is everything a worker needs to run a job's tasks (it travels in the task message,
credentials included, so the transport must be encrypted off loopback). `run_task` hands the
manifest to the engine and returns what the master records: counters, audit lines, failed keys.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ossimport.address import Location
from ossimport.engine.outcome import Kind, Outcome
from ossimport.engine.policy import Policy
from ossimport.engine.runner import Runner, RunOptions
from ossimport.engine.stats import Stats
from ossimport.engine.throttle import TokenBucket
from ossimport.engine.transfer import TransferOptions
from ossimport.jobs.protocol import location_from_dict, location_to_dict, options_from_dict, options_to_dict
from ossimport.storage import open_storage
from ossimport.storage.base import Entry, Storage, StorageOptions


@dataclass
class JobSpec:
    job: str
    src: Location
    dst: Location
    src_options: StorageOptions = field(default_factory=StorageOptions)
    dst_options: StorageOptions = field(default_factory=StorageOptions)
    job_type: str = "import"  # import | audit
    skip_existing: bool = False  # isSkipExistFile
    audit_mode: str = "general"  # simple | general | detailed (detailed = content checksums)
    audit_after_import: bool = True
    last_modify: int = 0  # audit: files newer than this are not verified
    threads: int = 20  # workerTaskThreadNum
    max_throughput_kbps: int = 0  # workerMaxThroughput(KB/s), 0 = unlimited; per worker
    abort_on_unexpected: bool = False  # workerAbortWhenUncatchedException: a worker exits on a bug
    multipart_threshold: int = 150 * 1024 * 1024
    part_size: int = 50 * 1024 * 1024
    part_threads: int = 3  # uploadThreadNumPerLargeFile
    record_md5: bool = False  # sys.properties workerRecordMd5

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["src"], d["dst"] = location_to_dict(self.src), location_to_dict(self.dst)
        d["src_options"], d["dst_options"] = options_to_dict(self.src_options), options_to_dict(self.dst_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        d = dict(d)
        d["src"], d["dst"] = location_from_dict(d["src"]), location_from_dict(d["dst"])
        d["src_options"], d["dst_options"] = options_from_dict(d["src_options"]), options_from_dict(d["dst_options"])
        return cls(**d)


@dataclass
class TaskResult:
    ok: bool
    done: dict[str, Any]
    audit: list[str]
    errors: list[str]


class TaskRunner:
    """Runs tasks of one job in a worker process, keeping its storages open between tasks."""

    def __init__(self, spec: JobSpec, bucket: TokenBucket | None = None) -> None:
        """`bucket`: the worker's own limit (`worker --max-throughput`); the job's
        workerMaxThroughput applies too, and the lower of the two wins."""
        self.spec = spec
        self.bucket = bucket
        job_rate = spec.max_throughput_kbps * 1024
        if job_rate > 0 and (bucket is None or bucket.rate > job_rate):
            self.bucket = TokenBucket(job_rate)
        self.src: Storage = open_storage(spec.src, spec.src_options)
        self.dst: Storage = open_storage(spec.dst, spec.dst_options)
        self._current: Runner | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.src.close()
        self.dst.close()

    def stop(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.stop()

    def run(self, entries: list[Entry], stats: Stats | None = None, received: float | None = None) -> TaskResult:
        """`received`: when this holder was given the task (epoch s). Temp files last written
        before then are left by an earlier holder (killed, or whose lease lapsed) and go; younger
        ones may belong to a holder still at work and stay (clocks agree within leaseSeconds)."""
        spec = self.spec
        audit: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def listener(o: Outcome) -> None:
            with lock:
                if o.failed:
                    audit.append(f"FAILED\t{o.key}\t{o.code}: {o.message}")
                    if o.key:
                        errors.append(o.key)
                elif o.kind in (Kind.COPIED, Kind.SKIPPED, Kind.VERIFIED):
                    audit.append(f"{o.kind.value.upper()}\t{o.key}\t{o.size}")

        verify = spec.job_type == "audit"
        if verify and spec.last_modify:
            entries = [e for e in entries if e.mtime <= spec.last_modify]
        opts = RunOptions(
            policy=Policy(mode="sync" if spec.skip_existing else "cp", skip_existing=spec.skip_existing),
            threads=spec.threads,
            verify_only=verify,
            verify_checksum=spec.audit_mode == "detailed",
            transfer=TransferOptions(
                multipart_threshold=spec.multipart_threshold,
                part_size=spec.part_size,
                part_threads=max(spec.part_threads, 1),
                checksum=spec.audit_after_import and spec.audit_mode == "detailed",
                keep_perms=spec.src_options.keep_perms,
                bucket=self.bucket,
                record_md5=spec.record_md5,
            ),
        )
        stats = stats or Stats()
        if not verify and not self.dst.abilities.multipart:
            # this task may have run before on a worker killed mid-copy; object stores clean
            # unfinished multipart uploads per large file, in the transfer itself
            self.dst.remove_stale_temps([e.key for e in entries], older_than=received)
        runner = Runner(self.src, self.dst, opts, stats, listener=listener)
        with self._lock:
            self._current = runner
        try:
            runner.run_manifest(entries)
        finally:
            with self._lock:
                self._current = None
        done = {
            "files": len(entries),
            "copied": stats.copied,
            "copied_bytes": stats.copied_bytes,
            "skipped": stats.skipped,
            "failed": stats.failed,
            "failed_bytes": stats.failed_bytes,
            "bytes": sum(e.size for e in entries),
        }
        # a stopped task left files unhandled (neither copied nor failed): never a success
        ok = stats.failed == 0 and not runner.cancelled
        return TaskResult(ok=ok, done=done, audit=audit, errors=sorted(set(errors)))
