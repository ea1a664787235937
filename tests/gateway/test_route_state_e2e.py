"""Two gateway processes, one Redis, real tiny-model replicas as stable: an admin change on
one gateway is obeyed by the other, a canary rolled back by their pooled traffic is rolled
back on both, and a restarted gateway picks the state up (`routing.backend: redis`). The
canary is a fake upstream, so it can be made to fail on cue."""

from __future__ import annotations

import time

import httpx

from tests.gateway.conftest import create_key, start_gateway, wait_until
from tests.gateway.test_gateway_faults import ADMIN, MESSAGES, gateway_config, post, variant

ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}


def routes(gateway_url: str) -> dict:
    response = httpx.get(f"{gateway_url}/admin/routes", headers=ADMIN_HEADERS, timeout=10)
    response.raise_for_status()
    return response.json()["tiny"]


def canary_weight(gateway_url: str) -> float:
    return routes(gateway_url)["variants"]["canary"]["weight"]


def test_two_gateways_share_weights_rollbacks_and_restarts(fake_upstreams, tiny_servers,
                                                           redis_url, tmp_path) -> None:
    canary = fake_upstreams("canary")
    store = redis_url  # keys shared as well, as in any multi-replica deployment
    keys = [create_key(store, f"tenant-{i}") for i in range(6)]
    config = gateway_config(store, [variant("stable", 90, *(s.url for s in tiny_servers)),
                                    variant("canary", 10, canary.url)],
                            redis_url=redis_url,
                            routing={"backend": "redis", "sync_seconds": 0.1},
                            rollback={"window_seconds": 120, "min_samples": 20,
                                      "max_error_rate_increase": 0.1})
    a = start_gateway(config, tmp_path, name="gateway-a")
    b = start_gateway(config, tmp_path, name="gateway-b")
    try:
        # an operator's change on a reaches b
        response = httpx.put(f"{a.url}/admin/routes/tiny/canary", json={"weight": 50},
                             headers=ADMIN_HEADERS, timeout=10)
        assert response.status_code == 200, response.text
        wait_until(lambda: canary_weight(b.url) == 50, 10, "b obeying a's weight change")
        assert routes(b.url)["state"]["backend"] == "redis"

        # the canary fails; each gateway alone sees fewer than min_samples canary calls,
        # together they see enough
        canary.set(mode="fail500")
        canary_calls = {a.url: 0, b.url: 0}
        for user in range(200):
            gateway = (a, b)[user % 2]
            answer = post(gateway.url, keys[user % len(keys)],
                          {"model": "tiny", "messages": MESSAGES, "user": f"pin-{user}",
                           "max_tokens": 4})
            canary_calls[gateway.url] += answer.headers.get("x-quiver-variant") == "canary"
            if canary_weight(a.url) == 0:
                break
        assert max(canary_calls.values()) < 20 <= sum(canary_calls.values())
        wait_until(lambda: canary_weight(a.url) == 0 and canary_weight(b.url) == 0, 10,
                   "the canary rolled back on both gateways")
        for gateway in (a, b):
            entry = routes(gateway.url)["variants"]["canary"]
            assert entry["rolled_back"] and entry["rollback_reason"] == "error_rate"
        samples = routes(a.url)["variants"]["canary"]["window"]["samples"]
        assert samples >= 20  # the pooled window: both gateways' canary calls

        def rollback_count(gateway_url: str) -> float:
            text = httpx.get(f"{gateway_url}/metrics", headers=ADMIN_HEADERS, timeout=10).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("quiver_gateway_rollbacks_total{")
                       and 'variant="canary"' in line and 'reason="error_rate"' in line)

        time.sleep(0.5)  # give a second, wrong count time to appear
        assert rollback_count(a.url) + rollback_count(b.url) == 1

        # every request now lands on stable, through either gateway
        for user in range(10):
            served = post((a, b)[user % 2].url, keys[0],
                          {"model": "tiny", "messages": MESSAGES, "user": f"after-{user}",
                           "max_tokens": 4})
            assert served.status_code == 200
            assert served.headers["x-quiver-variant"] == "stable"

        # a restart loses nothing: a new gateway starts rolled back
        a.stop()
        c = start_gateway(config, tmp_path, name="gateway-c")
        try:
            entry = routes(c.url)["variants"]["canary"]
            assert entry["weight"] == 0 and entry["rolled_back"]
            # and an operator bringing the canary back on c reaches b
            response = httpx.put(f"{c.url}/admin/routes/tiny/canary", json={"weight": 5},
                                 headers=ADMIN_HEADERS, timeout=10)
            assert response.status_code == 200
            wait_until(lambda: canary_weight(b.url) == 5
                       and not routes(b.url)["variants"]["canary"]["rolled_back"], 10,
                       "b obeying c's change")
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()
