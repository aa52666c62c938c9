"""EXPIRED dataflow subtasks. CPFS lists the status without saying when it is set; our rule (README):
a subtask still waiting (CREATED) `serviceSubTaskExpireSeconds` after its creation — its dataflow
stayed Stopped, or the service was not running — becomes EXPIRED with the reason, and never runs.

One guarded UPDATE does it: the executor starts only rows that are still CREATED (its own guarded
UPDATE), so each waiting subtask is either started or expired, never both, whatever the timing.
"""

from __future__ import annotations

import time
from typing import Any

from ossimport.service.subtasks import now


def expire_subtasks(svc: Any) -> list[str]:
    """Expire what waited too long; the ids expired (each also published as a `subtask` event)."""
    limit = svc.sysconf.serviceSubTaskExpireSeconds
    if limit <= 0:
        return []
    message = (f"EXPIRED: not started within {limit} s of its creation (serviceSubTaskExpireSeconds={limit}): its "
               "dataflow was Stopped, or the service was not running; it will not run: create the subtask again "
               "once the dataflow is Running")
    # CreateTime is UTC to the second: older than the limit to the second, so never early;
    # strftime('%s') reads it whatever its text layout, so the comparison is of numbers
    rows = svc.db.all(
        "UPDATE subtasks SET status = 'EXPIRED', end_time = ?, error = ? WHERE status = 'CREATED' "
        "AND CAST(strftime('%s', create_time) AS INTEGER) < ? RETURNING id",
        (now(), message, int(time.time()) - limit))
    for row in rows:
        svc.events.publish("subtask", {"DataFlowSubTaskId": row["id"], "Status": "EXPIRED", "ErrorMsg": message})
    return [row["id"] for row in rows]
