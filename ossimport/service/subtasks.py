"""Placeholder replaced below."""

from __future__ import annotations

from typing import Any


class Executor:
    def __init__(self, service: Any) -> None:
        self.service = service

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass
