"""Token-bucket pacing: a rate in bytes per second with a bounded burst.

The bucket is a pure function of a clock, so tests drive it with their own clock; :meth:`acquire`
waits on the event loop only in real use.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from kvlink.errors import ConfigError


class TokenBucket:
    """At most ``burst`` bytes at once, ``rate`` bytes per second on average."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tokens = 0.0
        self._stamp = clock()
        self.set_rate(rate, burst)
        self._tokens = float(self.burst)

    def set_rate(self, rate: float, burst: int | None = None) -> None:
        """Change the rate (and burst) from now on; tokens already earned are kept, up to the burst."""
        if rate <= 0:
            raise ConfigError(f"pacing rate must be positive, got {rate}")
        if burst is not None and burst <= 0:
            raise ConfigError(f"burst must be positive, got {burst}")
        self._refill()
        self.rate = float(rate)
        if burst is not None:
            self.burst = int(burst)
        self._tokens = min(self._tokens, float(self.burst))

    def _refill(self) -> None:
        now = self._clock()
        if hasattr(self, "rate"):
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` (may go into debt); return how long the caller must wait before sending."""
        if nbytes < 0:
            raise ConfigError(f"cannot reserve {nbytes} bytes")
        self._refill()
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent at the configured rate."""
        delay = self.reserve(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)

    def wait_time(self, nbytes: int) -> float:
        """How long until ``nbytes`` could be taken without debt (0 if now); reserves nothing."""
        self._refill()
        short = nbytes - self._tokens
        return 0.0 if short <= 0 else short / self.rate


def repace(bucket: TokenBucket | None, rate: float | None, burst: int | None, grid: int) -> TokenBucket | None:
    """The pacer for ``rate`` bytes/s (None: unpaced), ``bucket`` updated in place when there is
    one (tokens earned are kept). ``burst``: the configured burst, else ~4 ms at the rate (at
    least one ``grid`` chunk)."""
    if rate is None:
        return None
    burst = burst or max(grid, int(rate * 0.004))
    if bucket is None:
        return TokenBucket(rate, burst)
    if bucket.rate != rate or bucket.burst != burst:
        bucket.set_rate(rate, burst)
    return bucket
