"""Per-visitor rate limits on the storefront's open routes (no API key there, so a page, a bot or a buggy
script must not flood the store): a token bucket per key, thread-safe, bounded in memory.

    limiter = RateLimiter(per_minute=600, burst=120)
    limiter.check("visitor-id")     # raises RateLimited (429) with the seconds to wait
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class RateLimited(Exception):
    """Over the limit: `retry_after` seconds until one more request is allowed."""

    def __init__(self, key_kind: str, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"too many requests from this {key_kind}: retry in {retry_after:.1f} s")


class RateLimiter:
    """Token buckets: `burst` requests at once, refilled at `per_minute` a minute; the `max_keys` most
    recently seen keys are remembered (an evicted key starts again with a full bucket)."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000, clock=time.monotonic):
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"per_minute must be > 0 and burst >= 1, got {per_minute} and {burst}")
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def check(self, key: str, key_kind: str = "visitor", cost: float = 1.0) -> None:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < cost:
                self._buckets[key] = (tokens, now)
                raise RateLimited(key_kind, (cost - tokens) / self.rate)
            self._buckets[key] = (tokens - cost, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
