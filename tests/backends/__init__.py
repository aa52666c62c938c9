"""One module per backend under test; see tests/conftest.py for what each defines."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """A test server that cannot start here: a skip on a developer's machine, a failure under
    CI=true, where test.sh installs every server, so that a broken install cannot pass as a green
    run with its tests (the crash suite among them) skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"a test server is unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)
