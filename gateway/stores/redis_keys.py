"""`RedisKeyStore`: API keys in Redis, shared by every gateway replica.

Layout, all under `quiver:keys:`:

| key                     | type | holds                                             |
|-------------------------|------|---------------------------------------------------|
| `quiver:keys:k:<hash>`  | hash | one key's record (fields as `ApiKey`)             |
| `quiver:keys:active`    | hash | name -> hash of its unrevoked key                 |
| `quiver:keys:latest`    | hash | name -> hash of its newest key (usage goes there) |
| `quiver:keys:all`       | set  | every key hash, revoked ones included             |

Create, revoke and usage are Lua scripts, so each is atomic: two creates of one name cannot
both win, and a revoke cannot race an increment. Every call is bounded by `timeout_s`: a
hung or partitioned Redis fails a key reload instead of freezing it (and with it every
later revocation); the gateway keeps serving its last snapshot and says how old it is.
`active_keys()` is one script call (one round trip). The scripts build record keys from
the prefix, so this layout targets a single Redis (or a primary with replicas), not Redis
Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.keys import (
    ApiKey,
    KeyNameTakenError,
    KeyNotFoundError,
    KeyStoreError,
    KeyStoreUnavailableError,
    validate_key,
)
from gateway.stores.location import describe_location
from gateway.stores.redis_client import DEFAULT_TIMEOUT_S, open_redis

PREFIX = "quiver:keys:"
RECORD_PREFIX = PREFIX + "k:"
ACTIVE = PREFIX + "active"
LATEST = PREFIX + "latest"
ALL = PREFIX + "all"

# KEYS: active, latest, all, record; ARGV: name, hash, field/value pairs...
_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'name_taken' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'hash_taken' end
redis.call('HSET', KEYS[4], unpack(ARGV, 3))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return 'ok'
"""

# KEYS: active; ARGV: name, revoked_at, record prefix
_REVOKE = """
local h = redis.call('HGET', KEYS[1], ARGV[1])
if not h then return 0 end
redis.call('HSET', ARGV[3] .. h, 'revoked_at', ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: latest; ARGV: name, tokens, record prefix
_ADD_USAGE = """
local h = redis.call('HGET', KEYS[1], ARGV[1])
if not h then return false end
return redis.call('HINCRBY', ARGV[3] .. h, 'used_tokens', ARGV[2])
"""

# KEYS: active (hash) or all (set); ARGV: 'active' | 'all', record prefix
_RECORDS = """
local ids
if ARGV[1] == 'active' then ids = redis.call('HVALS', KEYS[1])
else ids = redis.call('SMEMBERS', KEYS[1]) end
local out = {}
for i, h in ipairs(ids) do out[i] = redis.call('HGETALL', ARGV[2] .. h) end
return out
"""


def _encode(key: ApiKey) -> list[str]:
    """Field/value pairs for HSET; `None` fields are left out."""
    fields: dict[str, str | None] = {
        "name": key.name, "key_hash": key.key_hash, "models": json.dumps(list(key.models)),
        "rpm": _opt(key.rpm), "tpm": _opt(key.tpm), "budget_tokens": _opt(key.budget_tokens),
        "used_tokens": str(key.used_tokens), "owner": key.owner,
        "can_pin_variant": "1" if key.can_pin_variant else "0",
        "max_concurrency": _opt(key.max_concurrency), "priority": key.priority,
        "created_at": repr(key.created_at), "revoked_at": _opt(key.revoked_at),
        "metadata": json.dumps(key.metadata, sort_keys=True),
    }
    return [part for name, value in fields.items() if value is not None
            for part in (name, value)]


def _opt(value: float | None) -> str | None:
    return None if value is None else repr(value)


def _int_or_none(value: str | None) -> int | None:
    return None if value is None else int(value)


def _decode(flat: list[str]) -> ApiKey:
    f = dict(zip(flat[::2], flat[1::2], strict=True))
    revoked_at = f.get("revoked_at")
    return ApiKey(name=f["name"], key_hash=f["key_hash"],
                  models=tuple(json.loads(f.get("models", "[]"))),
                  rpm=_int_or_none(f.get("rpm")), tpm=_int_or_none(f.get("tpm")),
                  budget_tokens=_int_or_none(f.get("budget_tokens")),
                  used_tokens=int(f.get("used_tokens", "0")), owner=f.get("owner"),
                  can_pin_variant=f.get("can_pin_variant") == "1",
                  max_concurrency=_int_or_none(f.get("max_concurrency")),
                  priority=f.get("priority", "normal"),
                  created_at=float(f.get("created_at", "0")),
                  revoked_at=None if revoked_at is None else float(revoked_at),
                  metadata=json.loads(f.get("metadata", "{}")))


class RedisKeyStore:
    """`KeyStore` over Redis (`redis://`, `rediss://` or `unix://` URL)."""

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._where = describe_location(url)
        self._client: aioredis.Redis = open_redis(url, timeout_s=timeout_s,
                                                  decode_responses=True)
        self._create = self._client.register_script(_CREATE)
        self._revoke = self._client.register_script(_REVOKE)
        self._add_usage = self._client.register_script(_ADD_USAGE)
        self._records = self._client.register_script(_RECORDS)

    def __repr__(self) -> str:
        return f"RedisKeyStore({self._where!r})"

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            raise KeyStoreUnavailableError(
                f"key store {self._where}: {type(exc).__name__}: {exc}") from exc

    async def create(self, key: ApiKey) -> None:
        validate_key(key)
        with self._translate():
            result = await self._create(
                keys=[ACTIVE, LATEST, ALL, RECORD_PREFIX + key.key_hash],
                args=[key.name, key.key_hash, *_encode(key)])
        if result == "name_taken":
            raise KeyNameTakenError(f"an active key named {key.name!r} already exists")
        if result == "hash_taken":
            raise KeyStoreError(f"key {key.name!r}: its hash is already stored")

    async def _load(self, index: str, mode: str) -> list[ApiKey]:
        with self._translate():
            records = await self._records(keys=[index], args=[mode, RECORD_PREFIX])
        return [_decode(flat) for flat in records if flat]

    async def list_keys(self, *, include_revoked: bool = False) -> list[ApiKey]:
        keys = await (self._load(ALL, "all") if include_revoked
                      else self._load(ACTIVE, "active"))
        return sorted(keys, key=lambda k: (k.created_at, k.name))

    async def revoke(self, name: str) -> bool:
        with self._translate():
            result = await self._revoke(keys=[ACTIVE], args=[name, repr(time.time()),
                                                               RECORD_PREFIX])
        return bool(result)

    async def active_keys(self) -> dict[str, ApiKey]:
        return {key.key_hash: key for key in await self._load(ACTIVE, "active")}

    async def add_usage(self, name: str, tokens: int) -> int:
        if isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"tokens must be 0 or more, got {tokens!r}")
        with self._translate():
            total = await self._add_usage(keys=[LATEST], args=[name, tokens, RECORD_PREFIX])
        if total is None:
            raise KeyNotFoundError(f"no key named {name!r}")
        return int(total)

    async def close(self) -> None:
        await self._client.aclose()
