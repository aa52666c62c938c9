"""S3 through moto's in-process HTTP server (most faithful S3 semantics, no signature checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

NAME = "s3-moto"
BUCKET = "ossimport-test"


@dataclass
class Handle:
    server: ThreadedMotoServer
    port: int
    bucket: str = BUCKET

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(tmp: Path) -> Handle:
    # port 0: the kernel picks a free port, no race with other test sessions on this machine
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server is bound and about to accept connections
    handle = Handle(server, server.get_host_and_port()[1])
    boto3.client(
        "s3", endpoint_url=handle.endpoint, region_name="us-east-1",
        aws_access_key_id="AKIDTEST1234", aws_secret_access_key="SECRET/TEST5678",
    ).create_bucket(Bucket=BUCKET)
    return handle


def stop(handle: Handle) -> None:
    handle.server.stop()


def address(handle: Handle, root: str) -> str:
    # The secret's '/' is written %2F: every test through this backend proves percent-decoding.
    return f"s3://AKIDTEST1234:SECRET%2FTEST5678@{handle.bucket}.127.0.0.1:{handle.port}/{root}/"


def env(handle: Handle) -> dict[str, str]:
    return {}
