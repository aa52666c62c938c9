"""Messages between master and workers, in one place.

Transport: a ZeroMQ ROUTER on the master, one DEALER per worker; each message is one frame of
JSON with a protocol version `v` and a `type`. Workers may sit on other hosts: nothing here
assumes a shared disk, so a task travels with its manifest and the job's storage settings.

worker -> master
  hello   {worker, host, pid, threads}                 on connect and after a master restart
  want    {worker}                                      give me a task
  beat    {worker, tasks: [task], leases: {task: lease}, progress: {task: [files, bytes]}}
                                                        renews the leases
  result  {worker, job, task, lease, ok, done: {...}, audit: [line], errors: [key]}
  release {worker, task, lease}                         offered while busy: give it to someone else
master -> worker
  task    {job, task, lease, manifest: str, spec: {...}}  a task, its lease id, how to run it
  idle    {wait}                                        nothing to do now; ask again later
  ack     {task}                                        result recorded (the worker forgets it)
  drop    {task}                                        stop working on it (lease lapsed, job cleaned)
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from ossimport.address import Location
from ossimport.errors import OssimportError
from ossimport.storage.base import StorageOptions

VERSION = 2  # 2: lease ids (fencing)


class ProtocolError(OssimportError):
    code = "ProtocolError"


def pack(kind: str, **body: Any) -> bytes:
    return json.dumps({"v": VERSION, "type": kind, **body}, ensure_ascii=False).encode()


def unpack(frame: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION or "type" not in msg:
        raise ProtocolError(f"message of another protocol version: {str(msg)[:80]!r}")
    return msg


def location_to_dict(loc: Location) -> dict[str, Any]:
    return {f.name: getattr(loc, f.name) for f in fields(loc)}


def location_from_dict(d: dict[str, Any]) -> Location:
    return Location(**d)


def options_to_dict(opts: StorageOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("skipped_links", None)
    return d


def options_from_dict(d: dict[str, Any]) -> StorageOptions:
    return StorageOptions(**d)
