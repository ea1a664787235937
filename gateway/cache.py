"""The response cache: what is cacheable, the cache key, and the `ResponseCache` protocol.

The key is SHA-256 over the tenant (a key's owner), the endpoint path, the public model and
the canonical JSON (sorted keys, no whitespace) of every body field that can change the
output — everything except `IGNORED_FIELDS`. Only deterministic requests are cacheable
(temperature 0, or a seed) unless `cache_nondeterministic` is set. Entries hold the exact
bytes sent to the client: a JSON body, or a complete SSE stream ending in `data: [DONE]`.

Stores: `gateway.stores.memory_cache.MemoryCache` (LRU with a byte cap and TTL) and
`gateway.stores.redis_cache.RedisCache` (TTL).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

# Fields that never change what the model answers.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                            "prompt_cache_key"})


@dataclass(frozen=True)
class CachedResponse:
    body: bytes
    content_type: str                 # application/json or text/event-stream
    variant: str                      # which variant produced it
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def is_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    @property
    def size_bytes(self) -> int:
        return len(self.body) + 128


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_deterministic(body: dict[str, Any]) -> bool:
    """Greedy (`temperature` 0) or seeded (an integer `seed`, any `n`). An absent or null
    temperature is OpenAI's default 1.0; non-numbers (`false`, `"0"`) are not trusted."""
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return True
    temperature = body.get("temperature")
    return _is_number(temperature) and temperature == 0


def cache_key(tenant: str, path: str, body: dict[str, Any]) -> str:
    fields = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    # ASCII escapes keep lone surrogates (valid in JSON text, "\ud800") encodable.
    canonical = json.dumps([tenant, path, fields], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class ResponseCache(Protocol):
    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, entry: CachedResponse) -> None:
        """Store `entry` (silently skipped when over the entry size limit)."""

    async def close(self) -> None: ...
