"""`RedisRateLimiter`: token buckets in Redis, shared by every gateway replica.

Each key is one hash, `{prefix}{key_name}`, with a level and a last-refill time (Redis
microseconds) per bucket: `rl`/`rts` for requests, `tl`/`tts` for tokens. One Lua script
refills, checks and takes both buckets atomically on Redis's own clock (`TIME`), so replicas
with skewed clocks still share one exact budget; a second script settles. The Lua mirrors
`gateway.ratelimit.refill / token_need / fits / settled_level`; the decision is built in
Python with `summarize` from the levels the script returns. A hash expires a couple of
minutes after both its buckets are full again (a missing bucket reads as full).

When Redis cannot be reached (within `timeout_s`; then, for a second, at once: see
`RedisBreaker`) the limiter fails open — admits, with `is_unchecked` on the decision and a
warning now and then — or, constructed with `fail_open=False` (`rate_limit.failure_mode:
fail_closed`), raises `LimiterUnavailableError` (the gateway answers 503). A settle that
cannot reach Redis is dropped.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from gateway.ratelimit import (
    LimiterUnavailableError,
    Limits,
    RateLimitDecision,
    summarize,
    token_need,
)
from gateway.stores.redis_client import (
    DEFAULT_TIMEOUT_S,
    OccasionalWarning,
    RedisBreaker,
    RedisUnavailableError,
    open_redis,
)

logger = logging.getLogger(__name__)

EXPIRE_MARGIN_MS = 120_000

_LUA_COMMON = """
local EPSILON = 1e-9
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function refill(level, ts, now, capacity)
  if level == nil or ts == nil then return capacity end
  local elapsed = math.max(0, (now - ts) / 1000000)
  return math.min(capacity, level + elapsed * (capacity / 60.0))
end
local function token_need(tokens, capacity)
  return math.min(math.max(tokens, 0), capacity)
end
local function fits(level, need) return level + EPSILON >= need end
local function fmt(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
local function ms_to_full(level, capacity)
  if capacity <= 0 then return 0 end
  return math.max(0, (capacity - level) * 60000.0 / capacity)
end
local function expire(key, rl, rpm, tl, tpm)
  local ms = math.max(ms_to_full(rl, rpm), ms_to_full(tl, tpm))
  redis.call('PEXPIRE', key, int(math.ceil(ms) + tonumber(ARGV[#ARGV])))
end
"""

# KEYS[1] the hash; ARGV rpm, tpm (0 = unlimited), tokens, expire margin ms.
# Returns {allowed 0|1, request level, token level} (after the take when allowed).
_ACQUIRE_LUA = _LUA_COMMON + """
local key = KEYS[1]
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_us()
local s = redis.call('HMGET', key, 'rl', 'rts', 'tl', 'tts')
local rl, tl, need = 0, 0, 0
if rpm > 0 then rl = refill(tonumber(s[1]), tonumber(s[2]), now, rpm) end
if tpm > 0 then
  tl = refill(tonumber(s[3]), tonumber(s[4]), now, tpm)
  need = token_need(tokens, tpm)
end
if not (fits(rl, rpm > 0 and 1 or 0) and fits(tl, need)) then
  return {0, fmt(rl), fmt(tl)}
end
if rpm > 0 then
  rl = rl - 1
  redis.call('HSET', key, 'rl', fmt(rl), 'rts', int(now))
end
if tpm > 0 then
  tl = tl - need
  redis.call('HSET', key, 'tl', fmt(tl), 'tts', int(now))
end
expire(key, rl, rpm, tl, tpm)
return {1, fmt(rl), fmt(tl)}
"""

# KEYS[1] the hash; ARGV rpm (0 = unlimited), tpm (> 0), reserved, actual, expire margin.
_SETTLE_LUA = _LUA_COMMON + """
local key = KEYS[1]
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserved, actual = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_us()
local s = redis.call('HMGET', key, 'rl', 'rts', 'tl', 'tts')
local rl = 0
if rpm > 0 then rl = refill(tonumber(s[1]), tonumber(s[2]), now, rpm) end
local tl = refill(tonumber(s[3]), tonumber(s[4]), now, tpm)
tl = math.min(tpm, tl + token_need(reserved, tpm) - math.max(actual, 0))
redis.call('HSET', key, 'tl', fmt(tl), 'tts', int(now))
expire(key, rl, rpm, tl, tpm)
return fmt(tl)
"""


class RedisRateLimiter:
    def __init__(self, url_or_client: str | aioredis.Redis, prefix: str = "quiver:rl:", *,
                 fail_open: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if isinstance(url_or_client, str):
            self._client = open_redis(url_or_client, timeout_s=timeout_s)
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
        self._prefix = prefix
        self._fail_open = fail_open
        self._acquire_script = self._client.register_script(_ACQUIRE_LUA)
        self._settle_script = self._client.register_script(_SETTLE_LUA)
        self._warning = OccasionalWarning(logger)
        self._breaker = RedisBreaker()

    async def acquire(self, key_name: str, limits: Limits, tokens: int) -> RateLimitDecision:
        if limits.is_unlimited:
            return RateLimitDecision(allowed=True)
        args = [limits.rpm or 0, limits.tpm or 0, max(tokens, 0), EXPIRE_MARGIN_MS]
        try:
            allowed, request_level, token_level = await self._breaker.call(
                lambda: self._acquire_script(keys=[self._key(key_name)], args=args))
        except RedisUnavailableError as exc:
            self._warn("acquire", key_name, exc)
            if not self._fail_open:
                raise LimiterUnavailableError(f"the rate limiter's Redis: {exc}") from exc
            return RateLimitDecision(allowed=True, is_unchecked=True)
        return summarize(limits, tokens, bool(allowed), float(request_level),
                         float(token_level))

    async def settle(self, key_name: str, limits: Limits, reserved: int, actual: int) -> None:
        if limits.tpm is None or token_need(reserved, limits.tpm) == max(actual, 0):
            return
        args = [limits.rpm or 0, limits.tpm, reserved, actual, EXPIRE_MARGIN_MS]
        try:
            await self._breaker.call(
                lambda: self._settle_script(keys=[self._key(key_name)], args=args))
        except RedisUnavailableError as exc:
            self._warn("settle", key_name, exc)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _key(self, key_name: str) -> str:
        # The braces make it a Redis Cluster hash tag (one slot per key, as the script needs).
        return f"{self._prefix}{{{key_name}}}"

    def _warn(self, operation: str, key_name: str, exc: Exception) -> None:
        outcome = "admitted unchecked" if self._fail_open else "refused"
        self._warning.warn("rate limit %s for key %s %s: Redis unavailable: %s", operation,
                           key_name, outcome if operation == "acquire" else "dropped", exc)
