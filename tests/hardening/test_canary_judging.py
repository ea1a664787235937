"""No key holder can steer or kill a canary (issue #17, item 5), through a real gateway in
front of two fake upstreams: client errors never count, one key cannot decide a verdict,
and latency is judged per token, not per call."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.hardening.conftest import (
    ADMIN,
    GatewayProcess,
    gateway_config,
    new_key,
    start_gateway,
)

MESSAGES = [{"role": "user", "content": "hello"}]
ROLLBACK = {"window_seconds": 120, "min_samples": 5, "max_error_rate_increase": 0.05,
            "max_p95_latency_ratio": 2.0}


@dataclass
class Canary:
    gateway: GatewayProcess
    store: str
    stable: object
    canary: object

    def call(self, key: str, variant: str, *, stream: bool = False,
             content: str = "hello") -> httpx.Response:
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}],
                "stream": stream}
        return httpx.post(f"{self.gateway.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {key}",
                                   "x-quiver-variant": variant})

    def canary_route(self) -> dict:
        routes = httpx.get(f"{self.gateway.url}/admin/routes", timeout=10,
                           headers={"authorization": f"Bearer {ADMIN}"}).json()
        return routes["tiny"]["variants"]["canary"]


@pytest.fixture
def judged(fake_upstreams, tmp_path) -> Iterator[Canary]:
    stable, canary = fake_upstreams("stable"), fake_upstreams("canary")
    store = str(tmp_path / "keys.db")
    config = gateway_config(store, [], rollback=ROLLBACK)
    config["models"] = [{"name": "tiny", "variants": [
        {"name": "stable", "weight": 90, "replicas": [stable.url]},
        {"name": "canary", "weight": 10, "replicas": [canary.url]}]}]
    gateway = start_gateway(config, tmp_path)
    yield Canary(gateway, store, stable, canary)
    gateway.stop()


def keys(judged: Canary, prefix: str, num: int) -> list[str]:
    return [new_key(judged.gateway, judged.store, f"{prefix}-{i}", can_pin_variant=True)
            for i in range(num)]


def in_parallel(calls) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_client_errors_never_count_for_or_against_a_variant(judged):
    (key,) = keys(judged, "clumsy", 1)
    for mode, stream in (("bad_request", False), ("bad_request_text", True),
                         ("stream_client_error", True)):
        judged.canary.set(mode=mode)
        for _ in range(8):
            response = judged.call(key, "canary", stream=stream)
            assert response.status_code in (200, 400), response.text
    route = judged.canary_route()
    assert route["weight"] == 10 and not route["rolled_back"]
    assert route["window"]["samples"] == 0


def test_one_key_cannot_roll_a_canary_back_but_many_can(judged):
    judged.canary.set(fail_marker="poison")
    flooder, *users = keys(judged, "judge", 6)
    good = [lambda k=k, v=v: judged.call(k, v) for k in users for v in ("stable", "canary")
            for _ in range(3)]
    bad = [lambda: judged.call(flooder, "canary", content="poison")] * 40
    statuses = [r.status_code for r in in_parallel(good + bad)]
    assert statuses.count(500) == 40
    route = judged.canary_route()
    assert route["weight"] == 10 and not route["rolled_back"], route
    # the same failures for everyone: that is the canary's fault
    in_parallel([lambda k=k: judged.call(k, "canary", content="poison") for k in users] * 2)
    route = judged.canary_route()
    assert route["rolled_back"] and route["rollback_reason"] == "error_rate", route


def test_latency_is_judged_per_token_not_per_call(judged):
    delays = {"response_delay_s": 0.05, "chunk_delay_s": 0.02}
    judged.stable.set(num_chunks=4, **delays)
    judged.canary.set(num_chunks=40, **delays)  # 10x longer answers, same token rate
    users = keys(judged, "timer", 5)
    calls = [lambda k=k, v=v: judged.call(k, v, stream=True)
             for k in users for v in ("stable", "canary") for _ in range(2)]
    assert all(r.status_code == 200 for r in in_parallel(calls))
    route = judged.canary_route()
    assert not route["rolled_back"], route
    assert route["window"]["p95_itl_s"] < 2 * 0.02 + 0.02
    judged.canary.set(num_chunks=8, chunk_delay_s=0.12)  # now its tokens are 6x slower
    in_parallel([lambda k=k: judged.call(k, "canary", stream=True) for k in users] * 2)
    route = judged.canary_route()
    assert route["rolled_back"] and route["rollback_reason"] == "latency", route
    assert "inter-token" in route["rollback_detail"]
