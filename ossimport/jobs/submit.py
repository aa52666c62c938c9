"""Submitting a job: the checks `console.sh submit` and the service's CreateJob share, so both
refuse the same configs with the same one-line messages."""

from __future__ import annotations

import os

from ossimport.errors import UsageError
from ossimport.jobs.config import JobConfig, dump_job
from ossimport.jobs.store import WorkDir


def submit_job(wd: WorkDir, cfg: JobConfig, source: str, *, dry_run: bool = False) -> None:
    """Queue `cfg` in `wd`, or raise UsageError naming the problem and the fix. `source` names
    where the config came from (its file, or the API action). `dry_run`: check only."""
    src, _ = cfg.locations()  # refuse now what could never run
    if src.backend == "local" and not os.path.isdir(src.path):
        raise UsageError(f"{source}: srcPrefix={src.path!r} is not an existing directory; fix srcPrefix")
    wd.create()
    if wd.exists(cfg.jobName):
        raise UsageError(f"job {cfg.jobName!r} already exists: 'console.sh clean {cfg.jobName}' first, "
                         "or 'console.sh retry' to retry its failed tasks", code="Job.AlreadyExists")
    if dry_run:
        return
    wd.submit(cfg.jobName, dump_job(cfg))
    wd.log("submit.log", f"submitted job {cfg.jobName} from {source}")
