"""A key's `max_concurrency` across gateway replicas: leases in a real Redis.

Store level: two `RedisKeyLeases` (two replicas) share one cap; a replica that dies holding
leases frees them when they expire, one that lives keeps them by renewing; Redis down fails
open (unchecked) or closed. End to end: two real gateways over the tiny-model replicas,
sharing Redis (`rate_limit.backend: redis`): a capped key's call running through one
gateway holds the other gateway's next call back, which is refused with a 429 once its wait
runs out, and goes through once the first call has ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gateway.ratelimit import LimiterUnavailableError
from gateway.stores.redis_leases import RedisKeyLeases
from tests.gateway.conftest import create_key, free_port, start_gateway, wait_until
from tests.gateway.test_fairness import ADMIN, call, metric


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable[..., RedisKeyLeases]]:
    opened: list[RedisKeyLeases] = []

    def open_replica(**kwargs) -> RedisKeyLeases:
        leases = RedisKeyLeases(kwargs.pop("url", redis_url), **kwargs)
        opened.append(leases)
        return leases

    yield open_replica
    for leases in opened:
        await leases.close()


async def test_two_replicas_share_one_cap(replicas) -> None:
    a, b = replicas(), replicas()
    held = [await a.acquire("k", 2, wait_s=0), await a.acquire("k", 2, wait_s=0)]
    assert all(held)
    assert await b.acquire("k", 2, wait_s=0) is None     # both places taken on A
    assert await b.acquire("other", 2, wait_s=0)          # another key's cap is its own
    waiting = asyncio.create_task(b.acquire("k", 2, wait_s=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()                             # still held back
    await a.release(held[0])
    lease = await asyncio.wait_for(waiting, 5)
    assert lease is not None and lease.is_checked
    assert await a.acquire("k", 2, wait_s=0) is None      # B's lease counts on A too
    await b.release(lease)
    assert await a.acquire("k", 2, wait_s=0) is not None


async def test_a_dead_replicas_leases_expire_a_live_ones_are_renewed(replicas) -> None:
    dead, live, other = replicas(ttl_s=0.6), replicas(ttl_s=0.6), replicas(ttl_s=0.6)
    await live.start()                                    # renews every ttl / 3
    assert await dead.acquire("dead-key", 1, wait_s=0)    # never renewed, never released
    assert await live.acquire("live-key", 1, wait_s=0)
    assert await other.acquire("dead-key", 1, wait_s=0) is None
    assert await other.acquire("dead-key", 1, wait_s=5) is not None  # once it expired
    await asyncio.sleep(1.5)                              # 2.5 ttl: renewed meanwhile
    assert await other.acquire("live-key", 1, wait_s=0) is None
    assert live.num_held() == 1


async def test_closing_a_replica_gives_its_leases_back(replicas) -> None:
    a, b = replicas(), replicas()
    assert await a.acquire("k", 1, wait_s=0)
    await a.close()
    assert await b.acquire("k", 1, wait_s=0) is not None


async def test_redis_down_fails_open_or_closed(replicas) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    lease = await replicas(url=down, timeout_s=0.2).acquire("k", 1, wait_s=0)
    assert lease is not None and not lease.is_checked
    with pytest.raises(LimiterUnavailableError):
        await replicas(url=down, timeout_s=0.2, fail_open=False).acquire("k", 1, wait_s=0)


def test_a_keys_cap_holds_across_two_gateways(tiny_servers, redis_url, tmp_path) -> None:
    store = str(tmp_path / "keys.db")
    key = create_key(store, "capped", max_concurrency=1)
    config = {
        "key_store": store, "admin_key": ADMIN, "cache": {"enabled": False},
        "redis_url": redis_url, "rate_limit": {"backend": "redis"},
        "admission": {"queue_timeout_seconds": 1.0},
        "models": [{"name": "tiny", "variants": [{
            "name": "stable", "weight": 100, "replicas": [s.url for s in tiny_servers]}]}]}
    first_gateway = start_gateway(config, tmp_path, name="first")
    second_gateway = start_gateway(config, tmp_path, name="second")
    try:
        for gateway in (first_gateway, second_gateway):
            wait_until(lambda g=gateway: httpx.get(f"{g.url}/ready").status_code == 200, 30,
                       "gateway ready")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(call, first_gateway.url, key, 1500)
            wait_until(lambda: metric(first_gateway.url, "quiver_gateway_key_in_flight_requests",
                                      key="capped") == 1, 30, "the first call running")
            started = time.monotonic()
            status, _, error = call(second_gateway.url, key, 8)
            waited = time.monotonic() - started
            still_running = not running.done()
            assert running.result()[0] == 200
        assert still_running, "the first call ended before the second was refused"
        assert status == 429, error
        assert error["code"] == "concurrency_limit_exceeded"
        assert "1 requests in flight across the gateway replicas" in error["message"]
        assert "retry-after" in error["headers"]
        assert waited >= 0.9                    # it waited for a place, then gave up
        assert metric(second_gateway.url, "quiver_gateway_admission_rejections_total",
                      key="capped", reason="concurrency_limit") == 1
        assert call(second_gateway.url, key, 8)[0] == 200   # the place is free again
    finally:
        first_gateway.stop()
        second_gateway.stop()
