"""DNS discovery of a variant's replicas (`discovery: dns`): the pool follows the names'
addresses, keeps what stays, health-checks what joins and retires what leaves."""

from __future__ import annotations

import json
from typing import Any

import httpx

from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.upstream.discovery import DnsDiscovery, with_address
from gateway.upstream.pool import UpstreamPool
from tests.gateway.conftest import create_key, start_gateway, wait_until

BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
KEY = ("tiny", "stable")


class FakeDns:
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.failing: set[str] = set()

    async def __call__(self, host: str, port: int) -> list[str]:
        if host in self.failing:
            raise OSError(f"temporary failure resolving {host}")
        return sorted(self.records.get(host, []))


def make_pool(**variant: Any) -> tuple[UpstreamPool, GatewayMetrics]:
    settings = GatewaySettings(
        models=[{"name": "tiny", "variants": [
            {"name": "stable", "weight": 100, "replicas": ["http://pods.svc:8001"],
             "discovery": "dns", **variant}]}],
        health_checks={"enabled": False})
    metrics = GatewayMetrics()
    return UpstreamPool(settings, metrics), metrics


def urls(pool: UpstreamPool) -> list[str]:
    return [state["url"] for state in pool.replica_states()]


def healthy_gauge(metrics: GatewayMetrics) -> dict[str, float]:
    return {sample.labels["replica"]: sample.value for family in metrics.registry.collect()
            if family.name == "quiver_gateway_upstream_healthy" for sample in family.samples}


async def test_replicas_follow_the_names_addresses() -> None:
    pool, metrics = make_pool()
    dns = FakeDns({"pods.svc": ["10.0.0.1", "10.0.0.2"]})
    discovery = DnsDiscovery({KEY: ["http://pods.svc:8001"]}, interval_seconds=60,
                             apply=pool.set_replicas, resolver=dns)
    assert urls(pool) == []  # nothing until the name resolves
    await discovery.refresh()
    assert urls(pool) == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]
    staying = pool._replicas[KEY][1]
    staying.breaker.on_failure()  # state a replica keeps while it stays

    dns.records["pods.svc"] = ["10.0.0.2", "10.0.0.3"]  # one pod left, one joined
    await discovery.refresh()
    assert urls(pool) == ["http://10.0.0.2:8001", "http://10.0.0.3:8001"]
    assert pool._replicas[KEY][0] is staying and staying.breaker.num_consecutive_failures == 1
    assert set(healthy_gauge(metrics)) == {"http://10.0.0.2:8001", "http://10.0.0.3:8001"}

    dns.failing.add("pods.svc")  # a DNS hiccup keeps what there was
    await discovery.refresh()
    assert urls(pool) == ["http://10.0.0.2:8001", "http://10.0.0.3:8001"]

    dns.failing.clear()
    dns.records["pods.svc"] = []  # scaled to zero: no replica, and the variant cannot serve
    await discovery.refresh()
    assert urls(pool) == [] and not pool.can_serve(*KEY)
    assert healthy_gauge(metrics) == {}


async def test_a_joining_replica_waits_for_its_first_health_check() -> None:
    settings = GatewaySettings(
        models=[{"name": "tiny", "variants": [
            {"name": "stable", "weight": 100, "replicas": ["http://pods.svc:8001"],
             "discovery": "dns"}]}])
    pool = UpstreamPool(settings, GatewayMetrics())
    pool.set_replicas(KEY, ["http://10.0.0.9:8001"])
    (replica,) = pool._replicas[KEY]
    assert not replica.is_healthy and not pool.can_serve(*KEY)
    replica.record_health(True, settings.health_checks)
    assert replica.is_healthy and pool.can_serve(*KEY)


def test_addresses_go_into_urls() -> None:
    assert with_address("http://pods:8001", "10.1.2.3") == "http://10.1.2.3:8001"
    assert with_address("https://pods.ns.svc:9443/", "fd00::7") == "https://[fd00::7]:9443"
    assert with_address("http://pods", "10.1.2.3") == "http://10.1.2.3"


def test_a_gateway_discovers_its_replicas_by_dns(fake_upstreams, tmp_path) -> None:
    port = fake_upstreams("discovered").url.rsplit(":", 1)[1]
    store = str(tmp_path / "keys.db")
    key = create_key(store, "dns")
    admin = "discovery-admin"
    config = {"key_store": store, "admin_key": admin, "discovery_interval_seconds": 0.5,
              "health_checks": {"interval_seconds": 0.2},
              "models": [{"name": "tiny", "variants": [
                  {"name": "stable", "weight": 100, "discovery": "dns",
                   "replicas": [f"http://localhost:{port}"]}]}]}
    gateway = start_gateway(config, tmp_path)
    try:
        upstreams = httpx.get(f"{gateway.url}/admin/upstreams", timeout=10, headers={
            "authorization": f"Bearer {admin}"}).json()["data"]
        assert [u["url"] for u in upstreams] == [f"http://127.0.0.1:{port}"]
        wait_until(lambda: httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 200,
                   10, "the discovered replica passing a health check")
        answer = httpx.post(f"{gateway.url}/v1/chat/completions", content=BODY, timeout=30,
                            headers={"authorization": f"Bearer {key}",
                                     "content-type": "application/json"})
        assert answer.status_code == 200, answer.text
    finally:
        gateway.stop()
