"""Azure Blob Storage through Azurite, Microsoft's emulator (tests/servers/azurite.py), on
127.0.0.1 with a port the kernel picks. Path-style addresses: http://127.0.0.1:PORT/ACCOUNT/CONTAINER,
shared-key signatures checked."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from servers.azurite import ACCOUNT, KEY, Azurite, Unavailable

from backends import unavailable

NAME = "azure"
__all__ = ["ACCOUNT", "KEY", "NAME", "Handle", "address", "container_client", "env", "start", "stop"]


@dataclass
class Handle:
    server: Azurite
    container: str

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


def start(tmp: Path) -> Handle:
    server = Azurite(tmp)
    try:
        server.start()
    except Unavailable as exc:
        unavailable(str(exc))
    except TimeoutError as exc:
        pytest.fail(str(exc))
    handle = Handle(server, f"c{uuid.uuid4().hex[:12]}")
    container_client(handle).create_container()
    return handle


def container_client(handle: Handle):  # type: ignore[no-untyped-def]
    return handle.server.container_client(handle.container)


def stop(handle: Handle) -> None:
    handle.server.stop()


def address(handle: Handle, root: str) -> str:
    # the key's '/' is written %2F, as users must
    return f"azure://{ACCOUNT}:{quote(KEY, safe='')}@{handle.container}.{handle.endpoint}/{root}/"


def env(handle: Handle) -> dict[str, str]:
    return {}
