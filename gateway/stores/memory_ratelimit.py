"""`MemoryRateLimiter`: token buckets in this process's memory (one gateway replica).

The arithmetic is `gateway.ratelimit`'s; this module only keeps each key's levels and the
time they were last refilled. Every method runs without an `await` in between reading and
writing a bucket, so coroutines of one event loop can never interleave inside a take.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.ratelimit import (
    Limits,
    RateLimitDecision,
    admits,
    fits,
    refill,
    settled_level,
    summarize,
    token_need,
)

PRUNE_EVERY = 1024      # acquires between sweeps that drop full (= forgotten) buckets


@dataclass
class _Bucket:
    level: float
    updated_at: float
    capacity: int           # the limit when last written, for pruning


class MemoryRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._num_acquires = 0

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    async def acquire(self, key_name: str, limits: Limits, tokens: int) -> RateLimitDecision:
        if limits.is_unlimited:
            return RateLimitDecision(allowed=True)
        now = self._clock()
        request_level = self._level(key_name, "requests", limits.rpm, now)
        token_level = self._level(key_name, "tokens", limits.tpm, now)
        allowed = admits(limits, tokens, request_level, token_level)
        if allowed:
            request_level -= 1.0
            token_level -= token_need(tokens, limits.tpm or 0)
            self._store(key_name, "requests", limits.rpm, request_level, now)
            self._store(key_name, "tokens", limits.tpm, token_level, now)
            self._maybe_prune(now)
        return summarize(limits, tokens, allowed, request_level, token_level)

    async def settle(self, key_name: str, limits: Limits, reserved: int, actual: int) -> None:
        if limits.tpm is None or token_need(reserved, limits.tpm) == max(actual, 0):
            return
        now = self._clock()
        level = self._level(key_name, "tokens", limits.tpm, now)
        self._store(key_name, "tokens", limits.tpm,
                    settled_level(level, limits.tpm, reserved, actual), now)

    async def close(self) -> None:
        self._buckets.clear()

    def _level(self, key_name: str, kind: str, limit: int | None, now: float) -> float:
        """The bucket's refilled level now; 0 for an unlimited kind (never consulted)."""
        if limit is None:
            return 0.0
        bucket = self._buckets.get((key_name, kind))
        if bucket is None:
            return refill(None, 0.0, limit)
        return refill(bucket.level, now - bucket.updated_at, limit)

    def _store(self, key_name: str, kind: str, limit: int | None, level: float,
               now: float) -> None:
        if limit is not None:
            self._buckets[(key_name, kind)] = _Bucket(level, now, limit)

    def _maybe_prune(self, now: float) -> None:
        """Now and then forget buckets that have refilled completely (missing reads as full),
        so keys that went idle cost no memory."""
        self._num_acquires += 1
        if self._num_acquires % PRUNE_EVERY:
            return
        full = [name for name, bucket in self._buckets.items()
                if fits(refill(bucket.level, now - bucket.updated_at, bucket.capacity),
                        float(bucket.capacity))]
        for name in full:
            del self._buckets[name]
