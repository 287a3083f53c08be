"""Limits on what an outsider controls: request rate per client address, signed-request
nonces seen recently (so a captured request cannot be replayed), both bounded in memory;
and the backlog clients may build in the mempool (``Backlog``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from ehrnode.core.errors import LimitExceeded, Unavailable

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


class Backlog:
    """Backpressure on clients' transactions. While more than ``high_water`` transactions
    are pending, or on their way in, a client's submission waits for a block to take some
    out (up to a timeout, then 503 ``mempool_busy``); 0 never holds one.

    Clients can send faster than blocks commit. Without this the difference piles up in
    the mempool of every node (tens of thousands of decoded transactions), and the memory
    and the work of that backlog slow the node that is meant to drain it. Transactions
    relayed by peers are not held here: each was admitted by a node that held its own
    clients back, and refusing it would only move its signature check to the block.
    """

    def __init__(self, pending: Callable[[], int], high_water: int) -> None:
        self.pending = pending
        self.high_water = high_water
        self.admitting = 0  # transactions of requests let in and not yet admitted
        self.waiting = 0  # requests held
        self._moved = asyncio.Event()

    def on_commit(self, _committed: object) -> None:
        """A block was committed: held requests look again (in the order they came)."""
        self._moved.set()
        self._moved = asyncio.Event()

    def full(self) -> bool:
        return self.high_water > 0 and self.pending() + self.admitting > self.high_water

    @contextlib.asynccontextmanager
    async def room(self, count: int, timeout: float) -> AsyncIterator[None]:
        """Wait until the backlog is below the mark, then count ``count`` transactions as
        on their way in until the block exits (the caller admits them inside it)."""
        if self.full():
            await self._wait(timeout)
        self.admitting += count
        try:
            yield
        finally:
            self.admitting -= count

    async def _wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.waiting += 1
        try:
            while self.full():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Unavailable(
                        f"this node holds more than {self.high_water} pending transactions "
                        "and no block took them in time; retry later",
                        code="mempool_busy",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._moved.wait(), remaining)
        finally:
            self.waiting -= 1
