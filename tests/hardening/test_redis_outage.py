"""The gateway with its Redis hung, partitioned or restarted (issue #17, item 13 and the key
store): every wait bounded, the configured failure mode honoured and exported, keys served
from the last snapshot (and said so), revocations applied once Redis answers again."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.stores import open_key_store
from tests.hardening.conftest import (
    ADMIN,
    GatewayProcess,
    create_key,
    gateway_config,
    new_key,
    start_gateway,
    wait_for,
)

MESSAGES = [{"role": "user", "content": "hello"}]


def call(gateway: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3},
                      headers={"authorization": f"Bearer {key}"})


def metric(gateway: GatewayProcess, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10,
                     headers={"authorization": f"Bearer {ADMIN}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return None


def test_a_hung_redis_fails_closed_fast_and_says_so(fake_upstreams, own_redis, blackhole,
                                                     tmp_path):
    upstream = fake_upstreams("fast")
    hole = blackhole(own_redis.port)
    store = str(tmp_path / "keys.db")
    gateway = start_gateway(gateway_config(
        store, [upstream.url], redis_url=hole.url, redis_timeout_seconds=0.5,
        rate_limit={"backend": "redis", "failure_mode": "fail_closed"}), tmp_path)
    try:
        key = new_key(gateway, store, "limited", rpm=1000)
        assert call(gateway, key).status_code == 200
        assert metric(gateway, "quiver_gateway_rate_limit_fail_open") == 0
        hole.swallow()                               # Redis stops answering, nothing resets
        started = time.monotonic()
        replies = [call(gateway, key) for _ in range(10)]
        took = time.monotonic() - started
        assert [r.status_code for r in replies] == [503] * 10
        assert {r.json()["error"]["code"] for r in replies} == {"rate_limiter_unavailable"}
        assert all(r.headers.get("retry-after") for r in replies)
        assert took < 5, f"10 calls took {took:.1f} s with Redis hung"  # bounded, not 10 x 1 s
        assert metric(gateway, "quiver_gateway_rate_limit_failures_total",
                      mode="fail_closed") == 10
        hole.heal()
        wait_for(lambda: call(gateway, key).status_code == 200, 10, "limits back with Redis")
    finally:
        gateway.stop()


def test_a_restarted_redis_is_failed_open_then_enforced_again(fake_upstreams, own_redis,
                                                              tmp_path):
    upstream = fake_upstreams("fast")
    store = str(tmp_path / "keys.db")
    gateway = start_gateway(gateway_config(
        store, [upstream.url], redis_url=own_redis.url,
        rate_limit={"backend": "redis"}), tmp_path)
    try:
        key = new_key(gateway, store, "bursty", rpm=3)
        assert [call(gateway, key).status_code for _ in range(4)] == [200, 200, 200, 429]
        own_redis.kill()
        assert [call(gateway, key).status_code for _ in range(5)] == [200] * 5  # fail open
        assert metric(gateway, "quiver_gateway_rate_limit_fail_open") == 1
        assert metric(gateway, "quiver_gateway_rate_limit_failures_total",
                      mode="fail_open") == 5
        own_redis.start()                            # empty: the buckets start full again

        def enforced() -> bool:
            return [call(gateway, key).status_code for _ in range(4)][-1] == 429

        wait_for(enforced, 15, "limits enforced after the restart")
    finally:
        gateway.stop()


def test_a_partitioned_key_store_serves_the_last_snapshot_then_applies_revocations(
        fake_upstreams, own_redis, blackhole, tmp_path):
    upstream = fake_upstreams("fast")
    hole = blackhole(own_redis.port)
    key = create_key(own_redis.url, "survivor")
    gateway = start_gateway(gateway_config(hole.url, [upstream.url], key_refresh_seconds=0.2,
                                           redis_timeout_seconds=0.5), tmp_path)
    try:
        assert call(gateway, key).status_code == 200
        assert metric(gateway, "quiver_gateway_key_store_up") == 1
        hole.swallow()
        wait_for(lambda: metric(gateway, "quiver_gateway_key_snapshot_age_seconds") > 2, 10,
                 "the snapshot to age")
        assert metric(gateway, "quiver_gateway_key_store_up") == 0
        assert call(gateway, key).status_code == 200     # served from the last snapshot
        asyncio.run(revoke(own_redis.url, "survivor"))   # straight into Redis
        hole.heal()   # new connections pass; the gateway's stuck one stays silent for ever
        # bounded by redis_timeout_seconds (0.5 s) + a reload, not by redis-py's default
        # socket timeout (5 s in redis-py 8, none in older releases)
        wait_for(lambda: call(gateway, key).status_code == 401, 3,
                 "the revocation to reach the gateway")
        assert metric(gateway, "quiver_gateway_key_store_up") == 1
        assert metric(gateway, "quiver_gateway_key_snapshot_age_seconds") < 2
        assert "Traceback" not in gateway.log
    finally:
        gateway.stop()


async def revoke(url: str, name: str) -> None:
    store = open_key_store(url)
    try:
        assert await store.revoke(name)
    finally:
        await store.close()
