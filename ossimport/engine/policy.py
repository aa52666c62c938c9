"""What to do with each (source, destination) pair.

Modes users know:
  cp      copy every source key (full copy)
  sync    copy keys missing at the destination or changed: size differs, or the source is newer
          (mtimes compared in whole seconds, because S3 LastModified and SFTP keep only seconds)
  --update          copy only when the source is newer (equal mtimes: when sizes differ)
  --checksum        changed means: size or content checksum differs (mtime ignored)
  skip_existing     ossimport isSkipExistFile: keep any destination of the same size
Dataflow conflict policies: OVERWRITE_EXISTING (cp), SKIP_THE_FILE, KEEP_LATEST (--update).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ossimport.errors import UsageError
from ossimport.storage.base import Entry


class Action(enum.Enum):
    COPY = "copy"
    SKIP = "skip"  # identical, or the policy keeps the destination
    COMPARE = "compare"  # same size; only a content checksum can tell (--checksum)
    EXTRA = "extra"  # only at the destination


CONFLICT_POLICIES = ("OVERWRITE_EXISTING", "SKIP_THE_FILE", "KEEP_LATEST")


@dataclass(frozen=True)
class Policy:
    mode: str = "sync"  # "cp" | "sync"
    update: bool = False
    checksum: bool = False
    skip_existing: bool = False
    keep_existing: bool = False  # dataflow SKIP_THE_FILE: any destination of the name is kept

    def __post_init__(self) -> None:
        if self.mode not in ("cp", "sync"):
            raise UsageError(f"unknown mode {self.mode!r}: use cp or sync")

    @classmethod
    def from_conflict(cls, conflict: str) -> Policy:
        """The policy of a dataflow ConflictPolicy."""
        if conflict == "OVERWRITE_EXISTING":
            return cls(mode="cp")
        if conflict == "SKIP_THE_FILE":  # "skips the file with the same name", whatever its size
            return cls(mode="sync", keep_existing=True)
        if conflict == "KEEP_LATEST":
            return cls(mode="sync", update=True)
        raise UsageError(f"ConflictPolicy {conflict!r} is not one of {', '.join(CONFLICT_POLICIES)}")

    @property
    def needs_destination(self) -> bool:
        """Whether deciding needs the destination's listing at all. A plain cp does not, so it
        starts copying at once and never pays for listing a large destination."""
        return self.mode != "cp" or self.update or self.skip_existing or self.keep_existing

    def decide(self, src: Entry | None, dst: Entry | None) -> Action:
        if src is None:
            return Action.EXTRA
        if dst is None:
            return Action.COPY
        if self.keep_existing:
            return Action.SKIP
        if self.skip_existing:
            return Action.SKIP if dst.size == src.size else Action.COPY
        src_sec, dst_sec = int(src.mtime), int(dst.mtime)
        if self.update:
            if src_sec > dst_sec or (src_sec == dst_sec and src.size != dst.size):
                return Action.COPY
            return Action.SKIP
        if self.mode == "cp":
            return Action.COPY
        if src.size != dst.size:
            return Action.COPY
        if self.checksum:
            return Action.COMPARE
        return Action.COPY if src_sec > dst_sec else Action.SKIP
