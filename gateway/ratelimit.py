"""Per-key rate limits: token buckets for requests/min and tokens/min.

`RateLimiter.acquire` takes one request and the estimated tokens (prompt + max_tokens)
atomically — both buckets or neither — and `settle` charges the difference once the real
usage is known (it may leave the token bucket in debt, which delays the next request).
Buckets start full; each refills continuously at limit/60 per second up to the limit.

Implementations: `gateway.stores.memory_ratelimit.MemoryRateLimiter` (one process) and
`gateway.stores.redis_ratelimit.RedisRateLimiter` (one Lua script, Redis's clock, so N
gateway replicas together admit within 2 % of the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

WINDOW_S = 60.0          # a bucket refills from empty to full in one minute
EPSILON = 1e-9           # float slack: a level within this of the need passes


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None     # until the request bucket is full again
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None        # when refused: until the request would pass
    refused_by: str | None = None             # "requests" | "tokens" when refused
    is_unchecked: bool = False                # admitted without the backend (failing open)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, OpenAI's format."""
        out: list[tuple[bytes, bytes]] = []
        for kind, limit, remaining, reset in (
                ("requests", self.limit_requests, self.remaining_requests,
                 self.reset_requests_s),
                ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_s)):
            if limit is None:
                continue
            out.append((f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()))
            out.append((f"x-ratelimit-remaining-{kind}".encode(),
                        str(max(0, remaining or 0)).encode()))
            out.append((f"x-ratelimit-reset-{kind}".encode(),
                        format_duration(reset or 0.0).encode()))
        return out


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `0.5s`, `12s`, `1m30s`, `2h0m0s`."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text or '0'}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


# --- bucket arithmetic -------------------------------------------------------------------
# The one definition of the token-bucket maths. `MemoryRateLimiter` calls these directly;
# the Lua script in `gateway.stores.redis_ratelimit` mirrors `refill`, `token_need`,
# `admits` and `settled_level` line for line, and the Redis limiter builds its decision with
# `summarize` from the levels the script returns.


def refill(level: float | None, elapsed_s: float, capacity: int) -> float:
    """The level after `elapsed_s` of refilling at capacity/60 per second; None = new = full."""
    if level is None:
        return float(capacity)
    return min(float(capacity), level + max(0.0, elapsed_s) * (capacity / WINDOW_S))


def token_need(tokens: int, capacity: int) -> float:
    """What a request takes from the token bucket: more than the capacity can never fit, so
    such a request waits for a full bucket and takes all of it."""
    return float(min(max(tokens, 0), capacity))


def fits(level: float, need: float) -> bool:
    return level + EPSILON >= need


def admits(limits: Limits, tokens: int, request_level: float, token_level: float) -> bool:
    """Both buckets fit this request (an unlimited kind always fits)."""
    return ((limits.rpm is None or fits(request_level, 1.0))
            and (limits.tpm is None or fits(token_level, token_need(tokens, limits.tpm))))


def wait_s(level: float, need: float, capacity: int) -> float:
    """Seconds until `level` has refilled to `need` (0 when it already fits)."""
    if fits(level, need):
        return 0.0
    return (need - level) * WINDOW_S / capacity


def settled_level(level: float, capacity: int, reserved: int, actual: int) -> float:
    """The token level after charging `actual` for a request that reserved `reserved`: a
    refund when actual is less (never above capacity), debt (below 0) when more."""
    return min(float(capacity), level + token_need(reserved, capacity) - max(actual, 0))


def summarize(limits: Limits, tokens: int, allowed: bool, request_level: float,
              token_level: float) -> RateLimitDecision:
    """The decision, from the levels after the take (allowed) or untouched (refused)."""
    retry_after_s: float | None = None
    refused_by: str | None = None
    if not allowed:
        waits = {"requests": 0.0, "tokens": 0.0}
        if limits.rpm is not None:
            waits["requests"] = wait_s(request_level, 1.0, limits.rpm)
        if limits.tpm is not None:
            waits["tokens"] = wait_s(token_level, token_need(tokens, limits.tpm), limits.tpm)
        # The binding limit is the one that keeps the request out longest.
        refused_by = max(waits, key=lambda kind: waits[kind])
        retry_after_s = waits[refused_by]
    remaining_requests, reset_requests_s = _bucket_view(limits.rpm, request_level)
    remaining_tokens, reset_tokens_s = _bucket_view(limits.tpm, token_level)
    return RateLimitDecision(
        allowed=allowed, limit_requests=limits.rpm, remaining_requests=remaining_requests,
        reset_requests_s=reset_requests_s, limit_tokens=limits.tpm,
        remaining_tokens=remaining_tokens, reset_tokens_s=reset_tokens_s,
        retry_after_s=retry_after_s, refused_by=refused_by)


def _bucket_view(limit: int | None, level: float) -> tuple[int | None, float | None]:
    """(remaining, seconds until full) for the headers; (None, None) when unlimited."""
    if limit is None:
        return None, None
    return max(0, math.floor(level + EPSILON)), wait_s(level, float(limit), limit)


class LimiterUnavailableError(Exception):
    """The limiter's backend cannot be reached and it fails closed."""


class RateLimiter(Protocol):
    async def acquire(self, key_name: str, limits: Limits, tokens: int) -> RateLimitDecision:
        """Take 1 request and `tokens` from `key_name`'s buckets, or refuse and take nothing;
        `LimiterUnavailableError` when the backend is down and the limiter fails closed."""

    async def settle(self, key_name: str, limits: Limits, reserved: int, actual: int) -> None:
        """Charge `actual - reserved` tokens (a refund when negative)."""

    async def close(self) -> None: ...

