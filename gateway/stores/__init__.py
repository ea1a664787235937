"""Storage backends: keys (SQLite, Redis), rate limits, the response cache and the route
state (memory, Redis), and the factories that open the configured one of each.

The factories live here, below `gateway.app` and `gateway.keys_cli` and above the store
modules, so imports run one way: the protocols (`gateway.keys`, `gateway.ratelimit`,
`gateway.cache`) <- the stores <- this package <- the app. Each store module is imported
only inside its factory, so importing this package stays cheap (`quiver --help`) and pulls
in no Redis client unless one is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway.keys import KeyStoreUnavailableError
from gateway.stores.location import is_redis_location

if TYPE_CHECKING:
    from gateway.admission import KeyLeases
    from gateway.cache import ResponseCache
    from gateway.keys import KeyStore
    from gateway.metrics import GatewayMetrics
    from gateway.ratelimit import RateLimiter
    from gateway.routing.state import RouteState
    from gateway.settings import GatewaySettings

__all__ = ["open_cache", "open_key_leases", "open_key_store", "open_limiter",
           "open_route_state"]


def open_key_store(location: str, *, timeout_s: float | None = None) -> KeyStore:
    """The store at `location`: a `redis://`, `rediss://` or `unix://` URL gives a
    `RedisKeyStore` (each call bounded by `timeout_s`), anything else is a SQLite file
    path (parent dirs are created)."""
    if not location.strip():
        raise KeyStoreUnavailableError("the key store location is empty")
    if is_redis_location(location):
        from gateway.stores.redis_client import DEFAULT_TIMEOUT_S
        from gateway.stores.redis_keys import RedisKeyStore

        return RedisKeyStore(location, timeout_s=timeout_s or DEFAULT_TIMEOUT_S)
    from gateway.stores.sqlite_keys import SqliteKeyStore

    return SqliteKeyStore(Path(location))


def open_limiter(settings: GatewaySettings) -> RateLimiter:
    if settings.rate_limit.backend == "redis":
        from gateway.stores.redis_ratelimit import RedisRateLimiter

        return RedisRateLimiter(settings.redis_url, timeout_s=settings.redis_timeout_seconds,
                                fail_open=settings.rate_limit.failure_mode == "fail_open")
    from gateway.stores.memory_ratelimit import MemoryRateLimiter

    return MemoryRateLimiter()


def open_key_leases(settings: GatewaySettings) -> KeyLeases | None:
    """Keys' `max_concurrency` counted across gateway replicas where their limits are shared
    (`rate_limit.backend: redis`, failing like the limiter); None: each gateway counts its
    own calls (`gateway.admission`)."""
    if settings.rate_limit.backend != "redis":
        return None
    from gateway.stores.redis_leases import RedisKeyLeases

    assert settings.redis_url is not None  # the settings' own check
    return RedisKeyLeases(settings.redis_url, timeout_s=settings.redis_timeout_seconds,
                          fail_open=settings.rate_limit.failure_mode == "fail_open")


def open_cache(settings: GatewaySettings, metrics: GatewayMetrics) -> ResponseCache | None:
    """The configured response cache; None when caching is off."""
    cache = settings.cache
    if not cache.enabled:
        return None
    if cache.backend == "redis":
        from gateway.stores.redis_cache import RedisCache

        return RedisCache(settings.redis_url, ttl_seconds=cache.ttl_seconds,
                          max_entry_bytes=cache.max_entry_bytes,
                          timeout_s=settings.redis_timeout_seconds)
    from gateway.stores.memory_cache import MemoryCache

    return MemoryCache(max_bytes=cache.max_bytes, max_entry_bytes=cache.max_entry_bytes,
                       ttl_seconds=cache.ttl_seconds, metrics=metrics)


def open_route_state(settings: GatewaySettings, metrics: GatewayMetrics) -> RouteState:
    """The configured route state backend (`routing.backend`)."""
    if settings.routing.backend == "redis":
        from gateway.stores.redis_routes import RedisRouteState

        assert settings.redis_url is not None  # the settings' own check
        return RedisRouteState(settings.redis_url, settings.models,
                               sync_seconds=settings.routing.sync_seconds,
                               timeout_s=settings.redis_timeout_seconds, metrics=metrics)
    from gateway.routing.state import MemoryRouteState

    return MemoryRouteState()
