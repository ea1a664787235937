"""`RedisKeyLeases`: a key's `max_concurrency` counted across every gateway replica.

Without it each gateway process counts only its own calls, so behind N replicas a key could
have N x `max_concurrency` calls in flight. Here every call of a capped key holds a *lease*:
a member of the sorted set `quiver:leases:<key>` whose score is its expiry (Redis
milliseconds, on Redis's own clock, so replicas with skewed clocks agree). One Lua script
drops expired leases, counts the rest and adds the new one only while the count is below the
cap; the call gives its lease back when its response ends (`ZREM`). A replica renews the
leases it holds every `ttl_s / 3` (one script for all of them), so a replica that dies
holding leases frees them within `ttl_s` and a slow stream never loses its own.

A call that finds its key at the cap waits, polling with a backoff of `POLL_MIN_S` to
`POLL_MAX_S`, until a lease is free or its wait runs out (the caller's queue timeout). When
Redis cannot be reached the leases fail like the rate limiter (`rate_limit.failure_mode`):
open — the call goes on unchecked and only this replica's own count holds the key back (a
warning now and then) — or closed (`LimiterUnavailableError`: the gateway answers 503).
The renewal script addresses many keys in one call, so this layout targets a single Redis
(or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid

from gateway.admission import Lease
from gateway.ratelimit import LimiterUnavailableError
from gateway.stores.redis_client import (
    DEFAULT_TIMEOUT_S,
    OccasionalWarning,
    RedisBreaker,
    RedisUnavailableError,
    open_redis,
)

logger = logging.getLogger(__name__)

PREFIX = "quiver:leases:"
TTL_S = 30.0
POLL_MIN_S = 0.01
POLL_MAX_S = 0.1

# KEYS[1] the key's lease set; ARGV: cap, lease id, ttl ms. 1: granted, 0: at the cap.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""

# KEYS: lease sets, one per lease; ARGV: ttl ms, then the lease ids in KEYS' order. Pushes
# back the expiry of every lease still there (one already dropped as expired stays gone).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
"""


class RedisKeyLeases:
    def __init__(self, url: str, *, fail_open: bool = True, ttl_s: float = TTL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.fail_open = fail_open
        self.ttl_s = ttl_s
        self._redis = open_redis(url, timeout_s=timeout_s)
        self._breaker = RedisBreaker()
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._replica = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._held: dict[str, str] = {}     # lease id -> key name, renewed until released
        self._renewer: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._warning = OccasionalWarning(logger)

    async def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="key-leases")

    async def close(self) -> None:
        """Stop renewing, give back whatever is still held, close the connections."""
        self._stop.set()
        if self._renewer is not None:
            await self._renewer
            self._renewer = None
        held, self._held = self._held, {}
        if held:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for lease_id, key_name in held.items():
                        pipe.zrem(PREFIX + key_name, lease_id)
                    await pipe.execute()
            except Exception as exc:  # they expire within ttl_s anyway
                logger.warning("could not give back %d key leases at shutdown: %s",
                               len(held), exc)
        await self._redis.aclose()

    # -- a call's side -----------------------------------------------------------------

    async def acquire(self, key_name: str, cap: int, *, wait_s: float) -> Lease | None:
        """A lease once the key has fewer than `cap` calls in flight on every replica,
        waiting up to `wait_s`; None when the wait ran out. `LimiterUnavailableError` when
        Redis is down and the leases fail closed."""
        lease_id = f"{self._replica}:{next(self._ids)}"
        deadline = time.monotonic() + wait_s
        pause = POLL_MIN_S
        while True:
            try:
                granted = await self._breaker.call(
                    lambda: self._acquire(keys=[PREFIX + key_name],
                                          args=[cap, lease_id, int(self.ttl_s * 1000)]))
            except RedisUnavailableError as exc:
                return self._unchecked(key_name, lease_id, exc)
            if granted:
                self._held[lease_id] = key_name
                return Lease(key_name, lease_id)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX_S)

    async def release(self, lease: Lease) -> None:
        if not lease.is_checked or self._held.pop(lease.lease_id, None) is None:
            return
        with contextlib.suppress(RedisUnavailableError):   # else it expires within ttl_s
            await self._breaker.call(
                lambda: self._redis.zrem(PREFIX + lease.key_name, lease.lease_id))

    def num_held(self) -> int:
        return len(self._held)

    # -- internals ---------------------------------------------------------------------

    def _unchecked(self, key_name: str, lease_id: str, exc: Exception) -> Lease:
        if not self.fail_open:
            raise LimiterUnavailableError(f"the key leases' Redis: {exc}") from exc
        self._warning.warn("Redis is unreachable (%s): keys' max_concurrency is counted by "
                           "this gateway replica alone until it is back", exc)
        return Lease(key_name, lease_id, is_checked=False)

    async def _renew_forever(self) -> None:
        period = self.ttl_s / 3
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=period)
                return
            except TimeoutError:
                pass
            await self.renew()

    async def renew(self) -> None:
        """Push back the expiry of every lease this replica holds (the renewer's round)."""
        held = list(self._held.items())
        if not held:
            return
        keys = [PREFIX + key_name for _, key_name in held]
        args = [int(self.ttl_s * 1000), *(lease_id for lease_id, _ in held)]
        try:
            await self._breaker.call(lambda: self._renew(keys=keys, args=args))
        except RedisUnavailableError as exc:
            logger.warning("could not renew %d key leases: %s", len(held), exc)
