"""Named crash points, for tests of crash windows: with OSSIMPORT_CRASH_AT=<name> in its
environment a process dies at that point as if killed -9 (no cleanup, no flush), so a test hits
the window between two steps of a state change deterministically instead of by timing."""

from __future__ import annotations

import os

_AT = os.environ.get("OSSIMPORT_CRASH_AT", "")


def crashpoint(name: str) -> None:
    if _AT and _AT == name:
        os._exit(137)
