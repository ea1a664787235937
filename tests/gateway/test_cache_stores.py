"""Response cache: what is cacheable, the key, and both stores (memory LRU, Redis) against
exact bytes, TTLs, byte caps and a Redis that is down."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.cache import CachedResponse, cache_key, is_deterministic
from gateway.metrics import GatewayMetrics
from gateway.stores.memory_cache import MemoryCache
from gateway.stores.redis_cache import RedisCache, decode_entry, encode_entry
from tests.gateway.conftest import free_port

JSON_BODY = json.dumps({"id": "cmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "héllo ✓ \u0000 \r\n"}}]},
    ensure_ascii=False).encode("utf-8")
SSE_BODY = (b'data: {"choices":[{"delta":{"content":"He"}}]}\n\n'
            b'data: {"choices":[{"delta":{"content":"llo \\u00e9 \xc3\xa9"}}]}\r\n\r\n'
            b": keep-alive comment\n\n"
            b"data: [DONE]\n\n")


def entry(body: bytes = JSON_BODY, size: int | None = None, **fields) -> CachedResponse:
    """An entry; with `size`, one whose `size_bytes` is exactly `size`."""
    if size is not None:
        body = b"x" * (size - CachedResponse(b"", "", "").size_bytes)
    fields = {"content_type": "application/json", "variant": "stable", **fields}
    return CachedResponse(body=body, **fields)


def gauges(metrics: GatewayMetrics) -> tuple[float | None, float | None]:
    sample = metrics.registry.get_sample_value
    return sample("quiver_gateway_cache_entries"), sample("quiver_gateway_cache_size_bytes")


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryCache | RedisCache]:
    if request.param == "memory":
        cache: MemoryCache | RedisCache = MemoryCache(
            max_bytes=1 << 20, max_entry_bytes=4096, ttl_seconds=60)
    else:
        cache = RedisCache(request.getfixturevalue("redis_url"), ttl_seconds=60,
                           max_entry_bytes=4096)
    yield cache
    await cache.close()


# --- both stores -----------------------------------------------------------------------------


@pytest.mark.parametrize("original", [
    entry(JSON_BODY, prompt_tokens=12, completion_tokens=7),
    entry(SSE_BODY, content_type="text/event-stream; charset=utf-8", variant="canary",
          prompt_tokens=3, completion_tokens=2),
    entry(b"", variant="v-ü"),
    entry(bytes(range(256)) * 3)])
async def test_round_trip_is_byte_exact(store, original: CachedResponse) -> None:
    await store.put("k", original)
    loaded = await store.get("k")
    assert loaded == original
    assert loaded.body == original.body and loaded.is_stream == original.is_stream


async def test_missing_key_is_a_miss(store) -> None:
    assert await store.get("never-stored") is None


async def test_put_replaces(store) -> None:
    await store.put("k", entry(b"first"))
    await store.put("k", entry(b"second"))
    assert (await store.get("k")).body == b"second"


async def test_entry_over_the_entry_limit_is_skipped(store) -> None:
    await store.put("big", entry(size=4097))
    await store.put("fits", entry(size=4096))
    assert await store.get("big") is None
    assert (await store.get("fits")).size_bytes == 4096


# --- memory ----------------------------------------------------------------------------------


async def test_memory_ttl_expires_on_get() -> None:
    clock = FakeClock()
    metrics = GatewayMetrics()
    cache = MemoryCache(max_bytes=1 << 20, max_entry_bytes=4096, ttl_seconds=10,
                        metrics=metrics, clock=clock)
    await cache.put("k", entry(size=1000))
    assert gauges(metrics) == (1, 1000)
    clock.now += 9.999
    assert await cache.get("k") is not None
    clock.now += 0.001
    assert await cache.get("k") is None
    assert (cache.num_entries, cache.num_bytes) == (0, 0)
    assert gauges(metrics) == (0, 0)


async def test_memory_lru_evicts_least_recently_used_by_bytes() -> None:
    metrics = GatewayMetrics()
    cache = MemoryCache(max_bytes=3000, max_entry_bytes=2000, ttl_seconds=60, metrics=metrics)
    for key in "abc":
        await cache.put(key, entry(size=1000))
    assert (cache.num_entries, cache.num_bytes) == (3, 3000) == gauges(metrics)
    await cache.get("a")                                   # b is now least recently used
    await cache.put("d", entry(size=1000))
    assert [k for k in "abcd" if await cache.get(k)] == ["a", "c", "d"]
    await cache.put("e", entry(size=2000))                 # needs two slots: the two oldest
    assert [k for k in "acde" if await cache.get(k)] == ["d", "e"]
    assert (cache.num_entries, cache.num_bytes) == (2, 3000)
    assert gauges(metrics) == (2, 3000)


async def test_memory_replacing_counts_bytes_once() -> None:
    cache = MemoryCache(max_bytes=2500, max_entry_bytes=2500, ttl_seconds=60)
    await cache.put("a", entry(size=1000))
    await cache.put("b", entry(size=1000))
    await cache.put("a", entry(size=1500))                 # 1000 freed first: b survives
    assert (cache.num_entries, cache.num_bytes) == (2, 2500)
    assert await cache.get("b") is not None


async def test_memory_entry_larger_than_the_cap_evicts_nothing() -> None:
    cache = MemoryCache(max_bytes=2048, max_entry_bytes=4096, ttl_seconds=60)
    await cache.put("a", entry(size=1000))
    await cache.put("huge", entry(size=3000))
    assert await cache.get("huge") is None
    assert await cache.get("a") is not None


def test_memory_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError, match="ttl_seconds=0"):
        MemoryCache(max_bytes=100, max_entry_bytes=100, ttl_seconds=0)


# --- Redis -----------------------------------------------------------------------------------


async def test_redis_ttl_expires(redis_url: str) -> None:
    cache = RedisCache(redis_url, ttl_seconds=0.2, max_entry_bytes=4096, prefix="c:")
    await cache.put("k", entry(SSE_BODY))
    client = aioredis.Redis.from_url(redis_url)
    assert 0 < await client.pttl("c:k") <= 200
    assert (await cache.get("k")).body == SSE_BODY
    await asyncio.sleep(0.3)
    assert await cache.get("k") is None
    await client.aclose()
    await cache.close()


async def test_redis_values_are_compact(redis_url: str) -> None:
    original = entry(SSE_BODY, content_type="text/event-stream", prompt_tokens=3)
    cache = RedisCache(redis_url, ttl_seconds=60, max_entry_bytes=4096, prefix="c:")
    await cache.put("k", original)
    client = aioredis.Redis.from_url(redis_url)
    stored = await client.get("c:k")
    assert stored == encode_entry(original)
    assert len(stored) - len(SSE_BODY) < 128
    await client.aclose()
    await cache.close()


async def test_redis_unreadable_value_is_a_miss(redis_url: str, caplog) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.set("c:k", b"not a cache entry")
    cache = RedisCache(client, ttl_seconds=60, max_entry_bytes=4096, prefix="c:")
    with caplog.at_level(logging.WARNING):
        assert await cache.get("k") is None
    assert "decode" in caplog.text
    await cache.close()
    assert await client.ping()                             # a passed client stays open
    await client.aclose()


@pytest.mark.parametrize("data", [
    b"", b"QVC1", b"QVC1\x00\x00\x00\xff{}", b"XXXX\x00\x00\x00\x02{}",
    b"QVC1\x00\x00\x00\x02{}", b"QVC1\x00\x00\x00\x02[]", b"QVC1\x00\x00\x00\x02\xff\xfe"])
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_entry(data)


def test_redis_cache_refuses_a_decoding_client() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisCache(client, ttl_seconds=60, max_entry_bytes=4096)


async def test_redis_down_is_a_miss_and_put_does_not_raise(caplog) -> None:
    cache = RedisCache(f"redis://:secret-pw@127.0.0.1:{free_port()}/0", ttl_seconds=60,
                       max_entry_bytes=4096)
    with caplog.at_level(logging.WARNING):
        await cache.put("k", entry())
        assert await cache.get("k") is None
    assert "response cache put skipped" in caplog.text
    assert "secret-pw" not in caplog.text
    await cache.close()


# --- what is cacheable, and its key ----------------------------------------------------------

CHAT = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi"}],
        "temperature": 0, "max_tokens": 16}


@pytest.mark.parametrize("body, expected", [
    ({}, False),                                       # absent temperature = 1.0
    ({"temperature": None}, False),
    ({"temperature": 1}, False),
    ({"temperature": 0.7, "top_p": 0.1}, False),
    ({"temperature": 0}, True),
    ({"temperature": 0.0, "n": 3}, True),
    ({"temperature": 0.9, "seed": 7}, True),
    ({"seed": 0}, True),
    ({"seed": 7, "n": 4}, True),                       # n > 1 with a seed is reproducible
    ({"seed": None}, False),
    ({"temperature": False}, False),                   # not numbers: not trusted
    ({"temperature": "0"}, False),
    ({"seed": True}, False),
    ({"seed": "7"}, False)])
def test_is_deterministic(body: dict, expected: bool) -> None:
    assert is_deterministic(body) is expected


def test_cache_key_isolates_tenants_and_paths() -> None:
    key = cache_key("acme", "/v1/chat/completions", CHAT)
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == cache_key("acme", "/v1/chat/completions", dict(reversed(CHAT.items())))
    assert key != cache_key("globex", "/v1/chat/completions", CHAT)
    assert key != cache_key("acme", "/v1/completions", CHAT)
    # no ambiguity from joining: the tenant cannot swallow the path
    assert cache_key("a", "b/c", {}) != cache_key("a/b", "c", {})


@pytest.mark.parametrize("field", ["user", "metadata", "store", "service_tier"])
def test_cache_key_ignores_fields_that_do_not_change_the_answer(field: str) -> None:
    assert cache_key("t", "/p", {**CHAT, field: "x"}) == cache_key("t", "/p", CHAT)


@pytest.mark.parametrize("change", [
    {"temperature": 0.5}, {"seed": 1}, {"stop": ["\n"]}, {"max_tokens": 17}, {"stream": True},
    {"stream_options": {"include_usage": True}}, {"n": 2}, {"model": "other"},
    {"messages": list(reversed(CHAT["messages"]))},
    {"messages": [{"role": "user", "content": "hi "}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "required"}, {"parallel_tool_calls": False},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
    {"structured_outputs": {"choice": ["yes", "no"]}}, {"logit_bias": {"17": -100}}])
def test_cache_key_changes_with_anything_that_changes_the_answer(change: dict) -> None:
    assert cache_key("t", "/p", {**CHAT, **change}) != cache_key("t", "/p", CHAT)


def test_cache_key_survives_lone_surrogates() -> None:
    body = json.loads('{"model": "m", "prompt": "\\ud800 and \\udfff"}')
    other = json.loads('{"model": "m", "prompt": "\\ud801 and \\udfff"}')
    assert cache_key("t", "/v1/completions", body) != cache_key("t", "/v1/completions", other)
