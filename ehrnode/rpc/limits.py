"""Limits on what an outsider controls: request rate per client address, and signed-request
nonces seen recently (so a captured request cannot be replayed). Both bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict

from ehrnode.core.errors import LimitExceeded

MAX_TRACKED = 10_000


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return allowed


class ReplayCache:
    """Nonces of signed requests seen within ``window_ms``; refuses one seen before."""

    def __init__(self, window_ms: int, max_entries: int = 200_000) -> None:
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def add(self, nonce: bytes, ts: int) -> bool:
        """True the first time a nonce is seen. When the cache is full of nonces still inside
        the window it refuses new ones (LimitExceeded) rather than forget one early."""
        now = int(time.time() * 1000)
        while self._seen and next(iter(self._seen.values())) < now - self.window_ms:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.max_entries:
            raise LimitExceeded(
                "too many signed requests in the last two minutes; retry shortly",
                code="rate_limited",
            )
        self._seen[nonce] = now
        return True
