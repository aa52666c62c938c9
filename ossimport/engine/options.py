"""What a run is asked to do (RunOptions) and the items the engine's stages pass each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from ossimport.engine.listing import Filter, KeyRange
from ossimport.engine.policy import Policy
from ossimport.engine.transfer import TransferOptions
from ossimport.storage.base import Entry


@dataclass
class RunOptions:
    policy: Policy = field(default_factory=Policy)
    threads: int = 10
    # processes sharing the copies (engine/fanout.py); the threads are split among them. Only
    # for a run that lists (run()); 1 = this process alone
    processes: int = 1
    dryrun: bool = False
    delete_src: bool = False  # move: remove each source after its verified copy
    delete_dst: bool = False  # remove destination keys the source does not have
    # audit: compare only, copy nothing; a missing or different destination is a failure
    verify_only: bool = False
    verify_checksum: bool = False  # audit by content checksum, not only size
    filter: Filter = field(default_factory=Filter)
    key_range: KeyRange = field(default_factory=KeyRange)
    transfer: TransferOptions = field(default_factory=TransferOptions)


# (source entry, destination entry or None, destination key)
Item = tuple[Entry, Entry | None, str]
