"""What happened to one file, as one record.

The engine reports every outcome as an `Outcome` (kind, key, size, code, message, checksums), and
the front ends only render it: the CLI's FAILED lines and verify lists, a job's audit log, the
progress of copy processes (which send their outcomes to the parent as they are). None of them
parses a message to learn a code.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class Kind(enum.Enum):
    COPIED = "copied"
    SKIPPED = "skipped"  # identical at the destination, or kept by the policy
    VERIFIED = "verified"  # verify: identical
    FAILED = "failed"
    NOT_TRIED = "not-tried"  # failed without a request, after a failure every request would repeat
    EXTRA = "extra"  # only at the destination
    DELETED = "deleted"  # a destination extra removed (--delete-dst)
    DELETED_SOURCE = "deleted-source"  # a source removed after its verified copy (--delete-src)


# the kinds that end an item's handling (one per item); DELETED_SOURCE may follow COPIED or SKIPPED
TERMINAL = frozenset({Kind.COPIED, Kind.SKIPPED, Kind.VERIFIED, Kind.FAILED, Kind.NOT_TRIED})
FAILURES = frozenset({Kind.FAILED, Kind.NOT_TRIED})


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    # the source key; for EXTRA and DELETED the destination key; "" for a failure of the run as a
    # whole (an incomplete listing)
    key: str
    size: int = 0  # the file's size in bytes
    code: str = ""  # FAILED / NOT_TRIED: the error code users know (SIZE_NOT_MATCH, AccessDenied, ...)
    message: str = ""  # FAILED / NOT_TRIED: what happened, for people
    checksums: dict[str, str] = field(default_factory=dict)  # COPIED: what the destination reported

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES


Listener = Callable[[Outcome], None]
