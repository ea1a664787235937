"""Automatic canary rollback, driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from gateway.metrics import GatewayMetrics
from gateway.routing import CallOutcome
from gateway.routing.rollback import OutcomeWindow
from gateway.routing.router import Router
from gateway.settings import ModelRouteSettings, RollbackSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ROUTE = ModelRouteSettings(name="tiny", variants=[
    {"name": "stable", "weight": 90, "replicas": ["http://s:1"]},
    {"name": "canary", "weight": 10, "replicas": ["http://c:1"]},
])


def make_router(**rollback: object) -> tuple[Router, GatewayMetrics, FakeClock]:
    clock, metrics = FakeClock(), GatewayMetrics()
    settings = RollbackSettings(**{"window_seconds": 60, "min_samples": 20,
                                   "max_error_rate_increase": 0.05,
                                   "max_p95_latency_ratio": 2.0, **rollback})
    return Router([ROUTE], settings, metrics, clock=clock), metrics, clock


def feed(router: Router, variant: str, num: int, *, num_errors: int = 0,
         latency_s: float = 0.1, num_keys: int = 10) -> None:
    """`num` calls from `num_keys` keys in turn; errors spread evenly; each success
    with `latency_s` as both its time to first token and its inter-token latency."""
    for i in range(num):
        is_error = (i + 1) * num_errors // num > i * num_errors // num
        latency = None if is_error else latency_s
        router.record("tiny", variant, CallOutcome(f"key-{i % num_keys}", is_error=is_error,
                                                   ttft_s=latency, itl_s=latency))


def rollbacks(metrics: GatewayMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "quiver_gateway_rollbacks_total",
        {"model": "tiny", "variant": "canary", "reason": reason})
    return value or 0.0


def test_canary_errors_trip_a_rollback(caplog: pytest.LogCaptureFixture) -> None:
    router, metrics, _ = make_router()
    feed(router, "stable", 40, num_errors=2)  # 5 %
    with caplog.at_level(logging.WARNING, logger="gateway.routing.router"):
        feed(router, "canary", 20, num_errors=5)  # 25 % > 5 % + 5 points
    assert router.weights()["tiny"] == {"stable": 100.0, "canary": 0.0}
    assert rollbacks(metrics, "error_rate") == 1
    assert metrics.registry.get_sample_value(
        "quiver_gateway_route_weight_percent", {"model": "tiny", "variant": "canary"}) == 0
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "tiny" in message and "canary" in message and "error_rate" in message
    assert "0.250" in message
    assert {router.choose("tiny", f"user-{i}").variant for i in range(500)} == {"stable"}
    entry = router.snapshot()["tiny"]["variants"]["canary"]
    assert entry["rolled_back"] is True and entry["rollback_reason"] == "error_rate"
    feed(router, "canary", 20, num_errors=20)  # rolled back once only
    assert rollbacks(metrics, "error_rate") == 1


def test_no_rollback_below_min_samples() -> None:
    router, metrics, _ = make_router()
    feed(router, "canary", 19, num_errors=19)
    assert router.weights()["tiny"]["canary"] == 10.0
    assert rollbacks(metrics, "error_rate") == 0
    feed(router, "canary", 1, num_errors=1)  # 20th sample; no stable baseline: vs 0 %
    assert router.weights()["tiny"]["canary"] == 0.0
    assert rollbacks(metrics, "error_rate") == 1


def test_no_rollback_within_the_allowed_increase() -> None:
    router, metrics, _ = make_router()
    feed(router, "stable", 50, num_errors=10)  # 20 %
    feed(router, "canary", 50, num_errors=12)  # 24 % <= 25 %
    assert router.weights()["tiny"]["canary"] == 10.0
    assert rollbacks(metrics, "error_rate") == 0


def test_latency_rollback() -> None:
    router, metrics, _ = make_router()
    feed(router, "stable", 20, latency_s=0.1)
    feed(router, "canary", 20, latency_s=0.19)  # p95 0.19 <= 0.2
    assert router.weights()["tiny"]["canary"] == 10.0
    feed(router, "canary", 20, latency_s=0.5)  # p95 now 0.5 > 0.2
    assert router.weights()["tiny"]["canary"] == 0.0
    assert rollbacks(metrics, "latency") == 1 and rollbacks(metrics, "error_rate") == 0
    assert "p95" in router.snapshot()["tiny"]["variants"]["canary"]["rollback_detail"]


def test_latency_is_not_judged_without_a_stable_baseline() -> None:
    router, metrics, _ = make_router()
    feed(router, "stable", 5, latency_s=0.1)
    feed(router, "canary", 40, latency_s=5.0)
    assert router.weights()["tiny"]["canary"] == 10.0
    assert rollbacks(metrics, "latency") == 0


def test_window_expiry_forgets_old_samples() -> None:
    router, metrics, clock = make_router()
    feed(router, "canary", 19, num_errors=19)
    clock.now += 61
    feed(router, "canary", 20)  # would be 19 / 39 errors if the old ones counted
    assert router.weights()["tiny"]["canary"] == 10.0
    window = router.snapshot()["tiny"]["variants"]["canary"]["window"]
    assert window == {"samples": 20, "keys": 10, "error_rate": 0.0, "p95_ttft_s": 0.1,
                      "p95_itl_s": 0.1}


async def test_set_weight_resets_a_rollback() -> None:
    router, metrics, _ = make_router()
    feed(router, "canary", 20, num_errors=20)
    assert router.weights()["tiny"]["canary"] == 0.0
    await router.set_weight("tiny", "canary", 10)
    assert router.weights()["tiny"] == {"stable": 90.0, "canary": 10.0}
    entry = router.snapshot()["tiny"]["variants"]["canary"]
    assert entry["rolled_back"] is False and entry["window"]["samples"] == 0
    feed(router, "canary", 19)  # judged afresh: a good canary stays
    assert router.weights()["tiny"]["canary"] == 10.0
    feed(router, "canary", 21, num_errors=21)
    assert router.weights()["tiny"]["canary"] == 0.0
    assert rollbacks(metrics, "error_rate") == 2


def test_disabled_rollback_only_keeps_stats() -> None:
    router, metrics, _ = make_router(enabled=False)
    feed(router, "canary", 30, num_errors=30)
    assert router.weights()["tiny"]["canary"] == 10.0
    assert router.snapshot()["tiny"]["variants"]["canary"]["window"]["error_rate"] == 1.0


def test_stable_is_never_rolled_back() -> None:
    router, metrics, _ = make_router()
    feed(router, "stable", 30, num_errors=30)
    assert router.weights()["tiny"]["stable"] == 90.0


def test_outcome_window_percentile_and_cap() -> None:
    window = OutcomeWindow(window_seconds=10, max_samples=100)
    for i in range(1, 201):  # latencies 1..200; only the last 100 are kept
        window.add(0.0, CallOutcome(f"k{i % 7}", is_error=i % 2 == 0, itl_s=float(i)))
    stats = window.stats(0.0)
    assert stats.num_samples == 100 and stats.error_rate == 0.5
    assert stats.p95_itl_s == 195.0 and stats.p95_ttft_s is None
    assert window.stats(10.0).num_samples == 0


def test_one_key_holds_at_most_its_share_of_a_window() -> None:
    window = OutcomeWindow(window_seconds=60, max_key_share=0.2, min_key_samples=4)
    for i in range(100):
        window.add(float(i) / 100, CallOutcome("flooder", is_error=True))
    assert window.stats(1.0).num_samples == 4          # its floor, never more
    for i in range(40):
        window.add(1.0, CallOutcome(f"user-{i % 8}", is_error=False))
    stats = window.stats(1.0)
    assert stats.num_keys == 9 and stats.num_samples == 44
    assert stats.error_rate == 4 / 44                   # the flood weighs 9 %, not 71 %


def test_a_flooding_key_cannot_roll_a_canary_back() -> None:
    router, metrics, _ = make_router()
    feed(router, "stable", 40)
    feed(router, "canary", 40)                          # ten good keys
    feed(router, "canary", 500, num_errors=500, num_keys=1)  # one key, all errors
    assert router.weights()["tiny"]["canary"] == 10.0
    assert rollbacks(metrics, "error_rate") == 0


def test_long_answers_are_not_slow_answers() -> None:
    """Latency is judged per token: a canary serving longer completions at the same
    token rate is not rolled back, one with slower tokens is."""
    router, metrics, _ = make_router()
    feed(router, "stable", 40, latency_s=0.01)
    feed(router, "canary", 40, latency_s=0.015)
    assert router.weights()["tiny"]["canary"] == 10.0
    feed(router, "canary", 40, latency_s=0.05)          # tokens 5x slower
    assert router.weights()["tiny"]["canary"] == 0.0
    assert rollbacks(metrics, "latency") == 1
