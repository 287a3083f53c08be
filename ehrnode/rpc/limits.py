"""Limits on what an outsider controls: request rate per client address, and signed-request
nonces seen recently (so a captured request cannot be replayed). Both bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict

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
        now = int(time.time() * 1000)
        while self._seen:
            seen_at = next(iter(self._seen.values()))
            if seen_at >= now - self.window_ms and len(self._seen) < self.max_entries:
                break
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True
