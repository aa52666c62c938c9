"""From a job's frozen config to what the master scans and the workers run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ossimport.jobs.config import JobConfig, SysConfig, load_job
from ossimport.jobs.execute import JobSpec
from ossimport.jobs.scanner import JobPlan


def job_spec(cfg: JobConfig, sysconf: SysConfig) -> JobSpec:
    src, dst = cfg.locations()
    src_opts, dst_opts = cfg.storage_options(sysconf)
    return JobSpec(
        job=cfg.jobName,
        src=src,
        dst=dst,
        src_options=src_opts,
        dst_options=dst_opts,
        job_type=cfg.jobType,
        skip_existing=cfg.isSkipExistFile,
        audit_mode=cfg.auditMode,
        audit_after_import=cfg.isAuditAfterImport,
        last_modify=cfg.lastModify,
        threads=sysconf.workerTaskThreadNum,
        max_throughput_kbps=sysconf.workerMaxThroughput,
        abort_on_unexpected=sysconf.workerAbortWhenUncatchedException,
        multipart_threshold=cfg.multipartUploadThreshold,
        part_size=cfg.multipartUploadPartSize,
        part_threads=cfg.uploadThreadNumPerLargeFile,
        record_md5=sysconf.workerRecordMd5,
    )


def job_plan(cfg: JobConfig, sysconf: SysConfig) -> JobPlan:
    return JobPlan(
        spec=job_spec(cfg, sysconf),
        count_limit=cfg.taskObjectCountLimit,
        size_limit=cfg.taskObjectSizeLimit,
        import_since=cfg.importSince,
        incremental=cfg.isIncremental,
        interval=float(cfg.incrementalModeInterval),
        scan_threads=cfg.scanThreadCount,
        scan_depth=cfg.maxMultiThreadScanDepth,
    )


def plan_loader(sysconf: SysConfig) -> Callable[[Path], JobPlan]:
    def load(path: Path) -> JobPlan:
        return job_plan(load_job(path, allow_short_interval=sysconf.allowShortIncrementalInterval), sysconf)

    return load
