"""Alibaba Cloud OSS, as oss2 sees it: the OSS shim (tests/servers/oss_shim.py) in front of moto."""

from __future__ import annotations

import uuid
from pathlib import Path

from servers.oss_shim import OSSShim

NAME = "oss"
ACCESS_KEY = "OSSAKID1234"
SECRET_KEY = "OSSSECRET5678"


class Handle:
    def __init__(self, shim: OSSShim, bucket: str) -> None:
        self.shim = shim
        self.bucket = bucket


def start(tmp: Path) -> Handle:
    shim = OSSShim({ACCESS_KEY: SECRET_KEY})
    shim.start()
    bucket = f"oss-{uuid.uuid4().hex[:12]}"  # OSS names: lower case, digits, '-'
    shim.create_bucket(bucket)
    return Handle(shim, bucket)


def stop(handle: Handle) -> None:
    handle.shim.stop()


def address(handle: Handle, root: str) -> str:
    return f"oss://{ACCESS_KEY}:{SECRET_KEY}@{handle.bucket}.127.0.0.1:{handle.shim.port}/{root}/"


def env(handle: Handle) -> dict[str, str]:
    return {}
