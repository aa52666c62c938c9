"""Batch dataflow tasks (TaskAction Import / Export): a whole Directory moved by the job system.

The task becomes a job named after the task id, with the dataflow's two roots written as the
keys of a job config (so it is validated, frozen, split, checkpointed, retried and counted like
any job); the task's status and progress are read from the job.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ossimport.address import Location, parse_address
from ossimport.errors import UsageError
from ossimport.jobs.config import JobConfig
from ossimport.jobs.submit import submit_job
from ossimport.service import paths
from ossimport.service.errors import ApiError, invalid

# job state -> task status
STATUS = {"SUBMITTED": "Pending", "RUNNING": "Executing", "WAITING": "Executing", "SUCCEED": "Completed",
          "FAILED": "Failed"}


def _side(side: str, loc: Location) -> dict[str, Any]:
    """A Location as the `src*` / `dest*` keys of a job config."""
    if loc.backend == "local":
        return {f"{side}Type": "local", f"{side}Prefix": loc.path}
    if loc.backend == "sftp":
        port = f":{loc.port}" if loc.port else ""
        return {f"{side}Type": "sftp", f"{side}Domain": f"{loc.user}@{loc.host}{port}" if loc.user else loc.host + port,
                f"{side}SecretKey": loc.password, f"{side}Prefix": loc.path}
    if loc.token:
        raise invalid("SourceStorage", "an address with an STS token cannot run a batch task (job configs "
                      "hold no token); use a key pair, or StreamImport / StreamExport")
    scheme = {True: "https://", False: "http://"}.get(loc.https, "") if loc.https is not None else ""
    keys = {f"{side}Type": loc.flavour, f"{side}Domain": scheme + loc.endpoint if loc.endpoint else "",
            f"{side}Bucket": loc.bucket, f"{side}Prefix": loc.prefix, f"{side}AccessKey": loc.access_key,
            f"{side}SecretKey": loc.secret_key}
    if side == "src" and loc.download:  # qiniu://...?download=: bodies from the download domain
        keys.update(isDownloadFromCdn=True, cdnDomain=loc.download)
    return keys


def _under(loc: Location, directory: str) -> Location:
    rel = directory.lstrip("/")
    if loc.backend in ("local", "sftp"):
        return replace(loc, path=loc.path.rstrip("/") + "/" + rel)
    return replace(loc, prefix=loc.prefix + rel)


def submit(svc: Any, flow: dict[str, Any], task_id: str, action: str, directory: str, dst_directory: str,
           conflict: str, dry_run: bool) -> None:
    """Queue the job of a batch task (or only check it, for DryRun)."""
    if conflict == "KEEP_LATEST":
        raise invalid("ConflictPolicy", "KEEP_LATEST is not offered for Import / Export; use OVERWRITE_EXISTING "
                      "or SKIP_THE_FILE")
    fs = paths.file_system_root(svc.conf_dir, flow["fs_id"], flow["fs_path"])
    store = paths.object_root(parse_address(flow["source_storage"]), flow["source_storage_path"])
    src, dst = (store, fs) if action == "Import" else (fs, store)
    mapping = {"jobName": task_id, **_side("src", _under(src, directory)), **_side("dest", _under(dst, dst_directory)),
               "isSkipExistFile": conflict == "SKIP_THE_FILE"}
    try:
        cfg = JobConfig.from_mapping(mapping, action, base_dir=svc.sysconf.base_dir)
        submit_job(svc.workdir, cfg, action, dry_run=dry_run)
    except UsageError as exc:
        # the job config's key names mean little here: say which side of the dataflow is wrong
        raise ApiError("InvalidParameter", f"the dataflow's {action} cannot run: {exc}") from None
    if not dry_run:
        svc.workers.start()


def progress(svc: Any, task_id: str) -> tuple[str, dict[str, Any]] | None:
    """(task status, the job's counters) of a batch task; None when its job is gone."""
    from ossimport.service.jobs_api import job_item

    if not svc.workdir.exists(task_id):
        return None
    job = job_item(svc, task_id)
    return STATUS.get(job["State"], "Executing"), job
