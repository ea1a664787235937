"""`open_redis(url)`: the asyncio Redis client the gateway's Redis stores create for a URL,
and `RedisBreaker`, which keeps a Redis outage from slowing every request down.

A blocking pool: a burst of more concurrent requests than connections waits briefly for a
free connection instead of failing (redis-py's default pool raises `MaxConnectionsError`,
which a fail-open limiter would turn into admitting everyone). Every wait is bounded by
`timeout_s` (the gateway's `redis_timeout_seconds`): connecting, each reply, and a free
connection from the pool; redis-py's own retries are off (a retry is one more timeout).

A hung or unreachable Redis still costs the first call its timeout; `RedisBreaker` then
answers every call at once for `COOLDOWN_S` (the store decides what that means: a cache
miss, a limiter failing open or closed) before letting calls try Redis again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT_S = 0.5
COOLDOWN_S = 1.0
WARN_INTERVAL_S = 10.0
T = TypeVar("T")


class RedisUnavailableError(Exception):
    """Redis did not answer (now, or moments ago: the breaker is open)."""


def open_redis(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               max_connections: int = MAX_CONNECTIONS,
               decode_responses: bool = False) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s,
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), decode_responses=decode_responses)
    # the client owns the pool: aclose() closes it
    return aioredis.Redis.from_pool(pool)


class OccasionalWarning:
    """A warning logged at most once per `interval_s` while Redis stays down, not once per
    request (`warn` says whether it logged)."""

    def __init__(self, logger: logging.Logger, interval_s: float = WARN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self.interval_s, self._clock = logger, interval_s, clock
        self._last = float("-inf")

    def warn(self, message: str, *args: object) -> bool:
        now = self._clock()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        self._logger.warning(message, *args)
        return True


class RedisBreaker:
    """After a failed call, fail the calls of the next `cooldown_s` at once."""

    def __init__(self, cooldown_s: float = COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._down_until = float("-inf")

    @property
    def is_open(self) -> bool:
        return self._clock() < self._down_until

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """`make()`'s result; `RedisUnavailableError` if Redis fails or failed just now."""
        if self.is_open:
            raise RedisUnavailableError("Redis failed moments ago; not retried yet")
        try:
            result = await make()
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            self._down_until = self._clock() + self.cooldown_s
            raise RedisUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        self._down_until = float("-inf")
        return result
