"""Canary routing: weighted rendezvous split, stickiness, pinning, shadowing, errors."""

from __future__ import annotations

import random

import pytest

from gateway.errors import BadRequestError, NotFoundError
from gateway.metrics import GatewayMetrics
from gateway.routing.router import Router
from gateway.settings import ModelRouteSettings, RollbackSettings

NUM_KEYS = 2000


def make_route(canary_weight: float = 10.0, shadow_percent: float | None = None,
               shadow_variant: str = "shadow") -> ModelRouteSettings:
    variants = [
        {"name": "stable", "weight": 100 - canary_weight, "replicas": ["http://s:1"]},
        {"name": "canary", "weight": canary_weight, "replicas": ["http://c:1"],
         "upstream_model": "tiny-v2"},
        {"name": "shadow", "weight": 0, "replicas": ["http://sh:1"]},
    ]
    shadow = ({"variant": shadow_variant, "percent": shadow_percent}
              if shadow_percent is not None else None)
    return ModelRouteSettings(name="tiny", variants=variants, shadow=shadow)


def make_router(*routes: ModelRouteSettings, seed: int = 0) -> tuple[Router, GatewayMetrics]:
    metrics = GatewayMetrics()
    router = Router(list(routes) or [make_route()], RollbackSettings(), metrics,
                    rng=random.Random(seed))
    return router, metrics


def assignments(router: Router, num_keys: int = NUM_KEYS) -> dict[str, str]:
    return {f"user-{i}": router.choose("tiny", f"user-{i}").variant for i in range(num_keys)}


def share(assigned: dict[str, str], variant: str) -> float:
    return sum(v == variant for v in assigned.values()) / len(assigned)


@pytest.mark.parametrize("canary_weight", [10.0, 30.0, 50.0])
def test_split_matches_the_weights(canary_weight: float) -> None:
    router, _ = make_router(make_route(canary_weight))
    assigned = assignments(router)
    assert abs(share(assigned, "canary") - canary_weight / 100) <= 0.03
    assert share(assigned, "shadow") == 0  # weight 0 is never chosen


def test_same_key_always_gets_the_same_variant() -> None:
    router, _ = make_router(make_route(50.0))
    for key in ("alice", "bob", "carol"):
        variants = {router.choose("tiny", key).variant for _ in range(100)}
        assert len(variants) == 1


async def test_raising_the_canary_weight_moves_only_stable_users() -> None:
    router, _ = make_router(make_route(10.0))
    before = assignments(router)
    await router.set_weight("tiny", "canary", 30)
    after = assignments(router)
    assert router.weights()["tiny"] == {"stable": 70.0, "canary": 30.0, "shadow": 0.0}
    assert all(after[key] == "canary" for key, v in before.items() if v == "canary")
    moved = [key for key in before if before[key] != after[key]]
    assert moved and all(before[key] == "stable" for key in moved)
    assert abs(share(after, "canary") - 0.30) <= 0.03


async def test_lowering_the_canary_weight_moves_only_canary_users() -> None:
    router, _ = make_router(make_route(30.0))
    before = assignments(router)
    await router.set_weight("tiny", "canary", 10)
    after = assignments(router)
    assert all(after[key] == "stable" for key, v in before.items() if v == "stable")


def test_decision_names_the_upstream_model() -> None:
    router, _ = make_router()
    decisions = [router.choose("tiny", f"k{i}") for i in range(200)]
    for decision in decisions:
        expected = "tiny-v2" if decision.variant == "canary" else "tiny"
        assert decision.upstream_model == expected and decision.model == "tiny"


def test_pinned_variant_is_honoured_even_at_weight_zero() -> None:
    router, _ = make_router()
    decision = router.choose("tiny", "anyone", pinned_variant="shadow")
    assert decision.variant == "shadow"
    assert router.choose("tiny", "anyone", pinned_variant="canary").variant == "canary"


def test_unknown_model_and_variant_are_errors() -> None:
    router, _ = make_router()
    with pytest.raises(NotFoundError) as not_found:
        router.choose("gpt-5", "k")
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    assert not_found.value.status_code == 404
    with pytest.raises(BadRequestError) as bad:
        router.choose("tiny", "k", pinned_variant="nope")
    assert bad.value.code == "unknown_variant" and bad.value.status_code == 400


def test_shadow_percentage_and_never_the_chosen_variant() -> None:
    router, _ = make_router(make_route(10.0, shadow_percent=20.0))
    decisions = [router.choose("tiny", f"user-{i}") for i in range(NUM_KEYS)]
    mirrored = [d for d in decisions if d.shadow_variant is not None]
    assert abs(len(mirrored) / NUM_KEYS - 0.20) <= 0.03
    assert all(d.shadow_variant == "shadow" for d in mirrored)
    assert router.choose("tiny", "x", pinned_variant="shadow").shadow_variant is None


def test_shadow_of_a_routed_variant_skips_requests_routed_to_it() -> None:
    router, _ = make_router(make_route(50.0, shadow_percent=100.0, shadow_variant="canary"))
    for i in range(200):
        decision = router.choose("tiny", f"user-{i}")
        expected = None if decision.variant == "canary" else "canary"
        assert decision.shadow_variant == expected


def test_no_shadow_without_config() -> None:
    router, _ = make_router()
    assert all(router.choose("tiny", f"u{i}").shadow_variant is None for i in range(200))


async def test_set_weight_validates_and_updates_gauges() -> None:
    router, metrics = make_router()

    def gauge(variant: str) -> float | None:
        return metrics.registry.get_sample_value(
            "quiver_gateway_route_weight_percent", {"model": "tiny", "variant": variant})

    assert (gauge("stable"), gauge("canary"), gauge("shadow")) == (90.0, 10.0, 0.0)
    await router.set_weight("tiny", "canary", 25)
    assert (gauge("stable"), gauge("canary")) == (75.0, 25.0)
    with pytest.raises(BadRequestError):
        await router.set_weight("tiny", "canary", 101)
    with pytest.raises(BadRequestError):
        await router.set_weight("tiny", "canary", float("nan"))
    with pytest.raises(BadRequestError):  # stable has only 75 to give
        await router.set_weight("tiny", "shadow", 80)
    with pytest.raises(NotFoundError):
        await router.set_weight("tiny", "nope", 5)
    with pytest.raises(NotFoundError):
        await router.set_weight("gpt-5", "canary", 5)
    await router.set_weight("tiny", "canary", 0)  # its share goes back to stable
    assert router.weights()["tiny"] == {"stable": 100.0, "canary": 0.0, "shadow": 0.0}
    with pytest.raises(BadRequestError):  # nothing would be left with a weight
        await router.set_weight("tiny", "stable", 0)
    assert router.weights()["tiny"]["stable"] == 100.0


def test_several_models_and_snapshot() -> None:
    other = ModelRouteSettings(name="big", variants=[
        {"name": "stable", "weight": 100, "replicas": ["http://b:1"]}])
    router, _ = make_router(make_route(10.0, shadow_percent=5.0), other)
    assert router.model_names() == ["tiny", "big"]
    assert router.choose("big", "k").variant == "stable"
    snapshot = router.snapshot()
    canary = snapshot["tiny"]["variants"]["canary"]
    assert canary["weight"] == 10.0 and canary["configured_weight"] == 10.0
    assert canary["rolled_back"] is False and canary["window"]["samples"] == 0
    assert snapshot["tiny"]["shadow"] == {"variant": "shadow", "percent": 5.0}
    assert snapshot["big"]["shadow"] is None
