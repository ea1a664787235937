"""`RedisCache`: the response cache in Redis, shared by every gateway replica, with TTL.

Each entry is one string, `{prefix}{key}`, set with `PX` = the TTL. Its value is
`MAGIC`, a 4-byte big-endian header length, a compact JSON header (content type, variant,
token counts), then the body bytes untouched — so JSON and SSE bodies round-trip exactly.
Eviction under memory pressure is Redis's own `maxmemory-policy` (allkeys-lru suits it).

The cache is an optimisation, never a dependency: a Redis error (or an unreadable value)
on `get` is a miss and on `put` a skip, with a warning at most every `WARN_INTERVAL_S`
(`OccasionalWarning`) naming only the error (never the URL, which may hold a password).
Every call is bounded by the client's timeout, and after a failure `RedisBreaker` skips
Redis for a moment, so an outage costs requests no waiting.
"""

from __future__ import annotations

import json
import logging
import struct

import redis.asyncio as aioredis

from gateway.cache import CachedResponse
from gateway.stores.redis_client import (
    DEFAULT_TIMEOUT_S,
    OccasionalWarning,
    RedisBreaker,
    RedisUnavailableError,
    open_redis,
)

logger = logging.getLogger(__name__)

MAGIC = b"QVC1"
_HEADER = struct.Struct(">4sI")


def encode_entry(entry: CachedResponse) -> bytes:
    header = json.dumps(
        {"content_type": entry.content_type, "variant": entry.variant,
         "prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens},
        separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(MAGIC, len(header)) + header + entry.body


def decode_entry(data: bytes) -> CachedResponse:
    """The entry `encode_entry` wrote; ValueError for anything else."""
    if len(data) < _HEADER.size:
        raise ValueError("cache value is shorter than its header")
    magic, header_len = _HEADER.unpack_from(data)
    if magic != MAGIC or _HEADER.size + header_len > len(data):
        raise ValueError("cache value has an unknown format")
    start = _HEADER.size + header_len
    try:
        header = json.loads(data[_HEADER.size:start])
        return CachedResponse(
            body=bytes(data[start:]), content_type=str(header["content_type"]),
            variant=str(header["variant"]), prompt_tokens=int(header["prompt_tokens"]),
            completion_tokens=int(header["completion_tokens"]))
    except (KeyError, TypeError, UnicodeDecodeError) as exc:   # JSONDecodeError is a ValueError
        raise ValueError(f"cache value header is unreadable: {exc}") from exc


class RedisCache:
    def __init__(self, url_or_client: str | aioredis.Redis, ttl_seconds: float,
                 max_entry_bytes: int, prefix: str = "quiver:cache:", *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if ttl_seconds <= 0 or max_entry_bytes <= 0:
            raise ValueError(f"ttl_seconds and max_entry_bytes must be positive, got "
                             f"{ttl_seconds} and {max_entry_bytes}")
        if isinstance(url_or_client, str):
            self._client = open_redis(url_or_client, timeout_s=timeout_s)
            self._owns_client = True
        else:
            if url_or_client.get_connection_kwargs().get("decode_responses"):
                raise ValueError("RedisCache needs a client without decode_responses: "
                                 "bodies are bytes")
            self._client = url_or_client
            self._owns_client = False
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self.max_entry_bytes = max_entry_bytes
        self._prefix = prefix
        self._warning = OccasionalWarning(logger)
        self._breaker = RedisBreaker()

    async def get(self, key: str) -> CachedResponse | None:
        try:
            data = await self._breaker.call(lambda: self._client.get(self._prefix + key))
        except RedisUnavailableError as exc:
            self._warn("get", exc)
            return None
        if data is None:
            return None
        try:
            return decode_entry(data)
        except ValueError as exc:
            self._warn("decode", exc)
            return None

    async def put(self, key: str, entry: CachedResponse) -> None:
        if entry.size_bytes > self.max_entry_bytes:
            return
        try:
            await self._breaker.call(lambda: self._client.set(
                self._prefix + key, encode_entry(entry), px=self.ttl_ms))
        except RedisUnavailableError as exc:
            self._warn("put", exc)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _warn(self, operation: str, exc: Exception) -> None:
        self._warning.warn("response cache %s skipped: Redis unavailable: %s", operation, exc)
