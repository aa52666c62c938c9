"""A token bucket shared by every thread of a process: the bandwidth limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ossimport.engine.cancel import CancelToken


class TokenBucket:
    """Allows `rate` bytes per second on average, with bursts of at most `burst` bytes.

    Callers ask for what they are about to send; a request larger than the burst is served in
    burst-sized slices so one large read cannot starve the others for long."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        # a quarter second of traffic keeps the limit smooth without costing throughput
        self.burst = float(burst) if burst else max(self.rate / 4, 64 * 1024)
        self._clock, self._sleep = clock, sleep  # a test may run the bucket on a clock of its own
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def consume(self, amount: int, cancel: CancelToken | None = None) -> None:
        """Take `amount` bytes' worth of tokens, waiting for them; a cancel ends the wait with
        Cancelled (at 1 Mbit/s a 16 MiB part is two minutes of waiting)."""
        remaining = float(amount)
        while remaining > 0:
            take = min(remaining, self.burst)
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                self._tokens -= take  # may go negative: the debt is paid by waiting below
                wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                if cancel is not None:
                    cancel.sleep(wait)
                else:
                    self._sleep(wait)
            remaining -= take


def mbit_to_bytes(mbit_per_s: float) -> float:
    """--bwlimit is in Mbit/s (ads-cli): 1 Mbit/s = 125,000 bytes/s."""
    return mbit_per_s * 1_000_000 / 8
