"""Shared route state (`routing.backend: redis`): several routers, one real Redis.

Each "replica" is a `Router` with its own `RedisRouteState`, as in a gateway process, so
these tests run the real sync, compare-and-set and sample pooling; `test_route_state_e2e`
does the same with gateway processes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.errors import RouteStateDownError
from gateway.metrics import GatewayMetrics
from gateway.routing import CallOutcome
from gateway.routing.rollback import RollbackVerdict
from gateway.routing.router import Router
from gateway.routing.state import RouteDoc
from gateway.settings import ModelRouteSettings, QualitySettings, RollbackSettings
from gateway.stores.redis_routes import RedisRouteState
from tests.gateway.conftest import free_port, wait_until

SYNC_S = 0.05


def route(canary_weight: float = 10.0) -> ModelRouteSettings:
    return ModelRouteSettings(name="tiny", variants=[
        {"name": "stable", "weight": 100 - canary_weight, "replicas": ["http://s:1"]},
        {"name": "canary", "weight": canary_weight, "replicas": ["http://c:1"]}])


ROLLBACK = RollbackSettings(window_seconds=60, min_samples=20, max_key_share=1.0,
                            quality=QualitySettings(enabled=True, min_samples=10))


class Replica:
    def __init__(self, url: str, config: ModelRouteSettings) -> None:
        import time

        self.metrics = GatewayMetrics()
        self.state = RedisRouteState(url, [config], sync_seconds=SYNC_S, timeout_s=0.5,
                                     metrics=self.metrics)
        self.router = Router([config], ROLLBACK, self.metrics, clock=time.time,
                             state=self.state)

    def weights(self) -> dict[str, float]:
        return self.router.weights()["tiny"]

    def rollbacks(self, reason: str = "error_rate") -> float:
        return self.metrics.registry.get_sample_value(
            "quiver_gateway_rollbacks_total",
            {"model": "tiny", "variant": "canary", "reason": reason}) or 0.0

    def feed(self, num: int, *, is_error: bool, first_key: int = 0) -> None:
        for i in range(num):
            self.router.record("tiny", "canary", CallOutcome(
                f"key-{first_key + i}", is_error=is_error, ttft_s=None if is_error else 0.1))


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable]:
    started: list[Replica] = []

    async def start(config: ModelRouteSettings | None = None, url: str = redis_url) -> Replica:
        replica = Replica(url, config or route())
        await replica.state.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.state.close()


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.01)


async def test_a_weight_change_on_one_replica_is_obeyed_by_the_other(replicas) -> None:
    a, b = await replicas(), await replicas()
    await a.router.set_weight("tiny", "canary", 30)
    assert a.weights() == {"stable": 70.0, "canary": 30.0}
    await eventually(lambda: b.weights() == {"stable": 70.0, "canary": 30.0}, "b obeys")
    assert (b.router.snapshot()["tiny"]["state"]["version"]
            == a.router.snapshot()["tiny"]["state"]["version"])
    assert b.metrics.registry.get_sample_value(
        "quiver_gateway_route_weight_percent", {"model": "tiny", "variant": "canary"}) == 30.0
    # the other way round too, computed on the stored weights rather than b's own
    await b.router.set_weight("tiny", "canary", 40)
    await eventually(lambda: a.weights() == {"stable": 60.0, "canary": 40.0}, "a obeys")


async def test_canaries_are_judged_on_the_pooled_traffic_and_rolled_back_once(replicas) -> None:
    a, b = await replicas(), await replicas()
    # 12 failing calls on each: neither alone reaches min_samples (20), together they do
    a.feed(12, is_error=True)
    b.feed(12, is_error=True, first_key=100)
    await eventually(lambda: a.weights()["canary"] == 0 and b.weights()["canary"] == 0,
                     "both roll the canary back")
    await eventually(lambda: a.rollbacks() + b.rollbacks() == 1, "one replica counts it")
    await asyncio.sleep(10 * SYNC_S)  # no second count arrives later
    assert a.rollbacks() + b.rollbacks() == 1
    for replica in (a, b):
        entry = replica.router.snapshot()["tiny"]["variants"]["canary"]
        assert entry["rolled_back"] and entry["rollback_reason"] == "error_rate"


async def test_a_restart_loses_neither_weights_nor_rollbacks_nor_the_window(replicas) -> None:
    a = await replicas()
    await a.router.set_weight("tiny", "canary", 20)
    a.feed(8, is_error=False)
    await eventually(lambda: a.state.status()["up"] and not a.state._outbox, "a flushed")
    await a.state.close()
    c = await replicas()
    assert c.weights() == {"stable": 80.0, "canary": 20.0}
    assert c.router.snapshot()["tiny"]["variants"]["canary"]["window"]["samples"] == 8
    c.feed(20, is_error=True, first_key=50)  # with a's 8 good ones: 71 % errors
    assert c.weights()["canary"] == 0
    await eventually(lambda: c.rollbacks() == 1, "c's write counts")
    await c.state.close()
    d = await replicas()
    entry = d.router.snapshot()["tiny"]["variants"]["canary"]
    assert d.weights()["canary"] == 0 and entry["rollback_reason"] == "error_rate"


async def test_quality_samples_are_pooled_too(replicas) -> None:
    a, b = await replicas(), await replicas()
    for i in range(5):
        a.router.record_agreement("tiny", "canary", 0.2)
        b.router.record_agreement("tiny", "canary", 0.3 + i * 0.01)
    await eventually(lambda: a.weights()["canary"] == 0 and b.weights()["canary"] == 0,
                     "quality rollback on both")
    await eventually(lambda: a.rollbacks("quality") + b.rollbacks("quality") == 1,
                     "counted once")


async def test_an_operator_change_restarts_judging_everywhere(replicas) -> None:
    a, b = await replicas(), await replicas()
    a.feed(15, is_error=True)  # not yet a verdict
    await eventually(lambda: b.router.snapshot()["tiny"]["variants"]["canary"]["window"]
                     ["samples"] == 15, "b sees a's samples")
    await b.router.set_weight("tiny", "canary", 10)  # same weight, new epoch
    await eventually(lambda: a.router.snapshot()["tiny"]["variants"]["canary"]["window"]
                     ["samples"] == 0, "a forgets the old epoch's samples")
    a.feed(10, is_error=True, first_key=200)  # 10 < 20: the old 15 no longer count
    await asyncio.sleep(10 * SYNC_S)
    assert a.weights()["canary"] == 10 and b.weights()["canary"] == 10


async def test_a_verdict_reached_before_an_operator_change_is_declined() -> None:
    config = route()
    doc = RouteDoc.initial(config)
    verdict = RollbackVerdict("tiny", "canary", "error_rate", "errors")
    changed = doc.with_weight("stable", "canary", 10)   # epoch 0 -> 1
    assert changed.with_rollback("stable", verdict, epoch=0) is None
    rolled = changed.with_rollback("stable", verdict, epoch=1)
    assert rolled is not None and rolled.weights == {"stable": 100.0, "canary": 0.0}
    assert rolled.with_rollback("stable", verdict, epoch=1) is None  # already rolled back
    assert RouteDoc.from_json("tiny", rolled.to_json()) == rolled


async def test_a_new_config_replaces_the_stored_state_and_every_replica_follows(
        replicas) -> None:
    a = await replicas(route(10))
    await a.router.set_weight("tiny", "canary", 50)
    same = await replicas(route(10))  # same config: adopts the stored 50
    assert same.weights()["canary"] == 50
    new = await replicas(route(20))   # a release with new weights: they win
    assert new.weights() == {"stable": 80.0, "canary": 20.0}
    await eventually(lambda: a.weights()["canary"] == 20, "the old replica follows")


async def test_while_redis_is_down_rollbacks_apply_locally_and_are_written_on_return(
        replicas, tmp_path) -> None:
    binary = shutil.which("redis-server")
    assert binary is not None  # the redis_url fixture skipped otherwise
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    a = await replicas(url=url)
    assert not a.state.status()["up"] and a.weights()["canary"] == 10  # the config's
    assert a.metrics.registry.get_sample_value("quiver_gateway_route_state_up") == 0
    with pytest.raises(RouteStateDownError) as info:
        await a.router.set_weight("tiny", "canary", 30)
    assert info.value.status_code == 503 and info.value.code == "route_state_unavailable"
    a.feed(25, is_error=True)
    assert a.weights()["canary"] == 0 and a.rollbacks() == 0  # out now; written later
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_until, lambda: a.state.status()["up"], 20, "sync")
        await eventually(lambda: a.rollbacks() == 1, "the rollback is written and counted")
        b = await replicas(url=url)
        assert b.weights()["canary"] == 0
        assert b.router.snapshot()["tiny"]["variants"]["canary"]["rolled_back"]
    finally:
        process.terminate()
        process.wait(10)


async def test_a_replica_never_routes_to_a_variant_its_config_lacks(replicas) -> None:
    """A new release adds a variant: old replicas keep their own state rather than route
    to a variant they have no replicas for."""
    old = await replicas(route(10))
    three = ModelRouteSettings(name="tiny", variants=[
        {"name": "stable", "weight": 80, "replicas": ["http://s:1"]},
        {"name": "canary", "weight": 10, "replicas": ["http://c:1"]},
        {"name": "canary2", "weight": 10, "replicas": ["http://c2:1"]}])
    new = await replicas(three)
    assert new.weights() == {"stable": 80.0, "canary": 10.0, "canary2": 10.0}
    await asyncio.sleep(10 * SYNC_S)
    assert old.weights() == {"stable": 90.0, "canary": 10.0}
    assert {old.router.choose("tiny", f"user-{i}").variant for i in range(200)} <= {
        "stable", "canary"}
