"""The local file system backend: a directory under the session's temp dir."""

from __future__ import annotations

from pathlib import Path

NAME = "local"


def start(tmp: Path) -> Path:
    return tmp


def stop(handle: Path) -> None:
    pass


def address(handle: Path, root: str) -> str:
    (handle / root).mkdir(parents=True, exist_ok=True)
    return f"{handle / root}/"


def env(handle: Path) -> dict[str, str]:
    return {}
