"""`open_redis(url)`: the asyncio Redis client the gateway's Redis stores create for a URL.

A blocking pool: a burst of more concurrent requests than connections waits briefly for a
free connection instead of failing (redis-py's default pool raises `MaxConnectionsError`,
which a fail-open limiter would turn into admitting everyone). Short socket timeouts keep a
hung Redis from holding requests for long.
"""

from __future__ import annotations

import redis.asyncio as aioredis

MAX_CONNECTIONS = 64
POOL_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 1.0


def open_redis(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S)
    return aioredis.Redis.from_pool(pool)   # the client owns the pool: aclose() closes it
