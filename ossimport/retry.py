"""Retrying what may succeed on a second try: exponential backoff with full jitter.

Only errors that say so (`StorageError.retryable`: throttling such as S3 SlowDown, 5xx, broken
connections, a failed verification) are retried; a wrong key or a missing bucket fails at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ossimport.errors import StorageError

T = TypeVar("T")
log = logging.getLogger("ossimport")


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 4,
    what: str = "",
    base: float = 0.5,
    cap: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn` until it succeeds, at most `attempts` times in all."""
    attempt = 0
    while True:
        try:
            return fn()
        except StorageError as exc:
            attempt += 1
            if not exc.retryable or attempt >= attempts:
                raise
            delay = backoff_delay(attempt - 1, base, cap)
            # throttling asks explicitly for patience: never retry it faster than a second
            if exc.code in ("SlowDown", "Throttling", "TooManyRequests", "RequestLimitExceeded"):
                delay = max(delay, 1.0)
            log.debug("retrying %s in %.2fs after %s: %s", what, delay, exc.code, exc)
            sleep(delay)
