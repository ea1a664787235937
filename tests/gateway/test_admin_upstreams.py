"""`GET /admin/upstreams` on a real gateway app (in process: real pool, real sockets, real
health checks) in front of one live replica and one dead one (nothing listens on its port),
as an operator sees them during an incident."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.keys import ApiKey, generate_key, hash_key
from gateway.settings import load_settings
from gateway.stores import open_key_store
from tests.gateway.conftest import free_port
from tests.gateway.fake_upstream import FakeUpstream

ADMIN = "admin-key-for-upstreams"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
async def live() -> AsyncIterator[str]:
    fake = FakeUpstream(name="live")
    url = await fake.start()
    yield url
    await fake.stop()


@pytest.fixture
def dead() -> str:
    return f"http://127.0.0.1:{free_port()}"


@asynccontextmanager
async def gateway(tmp_path: Path, replicas: list[str],
                  **sections: Any) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A gateway app with one variant over `replicas`: `(client, api key)`."""
    store_path, secret = str(tmp_path / "keys.db"), generate_key()
    store = open_key_store(store_path)
    await store.create(ApiKey(name="ops", key_hash=hash_key(secret), created_at=time.time()))
    await store.close()
    settings = load_settings(None, key_store=store_path, admin_key=ADMIN, models=[
        # least_outstanding: these tests count on calls reaching each replica at random
        {"name": "tiny", "variants": [{"name": "stable", "weight": 100, "replicas": replicas,
                                       "balance": "least_outstanding"}]}],
        **sections)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://gateway") as client):
        yield client, secret


async def upstreams(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """The listing, by replica URL."""
    response = await client.get("/admin/upstreams", headers={"authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return {entry["url"]: entry for entry in body["data"]}


async def wait_for(client: httpx.AsyncClient,
                   predicate: Callable[[dict[str, dict[str, Any]]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while not predicate(states := await upstreams(client)):
        assert time.monotonic() < deadline, f"never reached; last listing: {states}"
        await asyncio.sleep(0.02)
    return states


def untroubled(url: str) -> dict[str, Any]:
    return {"model": "tiny", "variant": "stable", "url": url, "is_healthy": True,
            "num_failed_health_checks": 0, "circuit": "closed", "circuit_retry_in_s": 0.0,
            "num_outstanding": 0, "num_consecutive_failures": 0, "recent_failures": [],
            "max_model_len": None}  # the fakes list no context length


async def test_the_listing_needs_the_admin_key(tmp_path: Path, live: str):
    async with gateway(tmp_path, [live], health_checks={"enabled": False}) as (client, key):
        for headers in ({}, {"authorization": f"Bearer {key}"},
                        {"authorization": "Bearer wrong"}):
            response = await client.get("/admin/upstreams", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert live not in response.text


async def test_a_dead_replica_fails_its_health_checks_and_gets_no_traffic(
        tmp_path: Path, live: str, dead: str):
    async with gateway(tmp_path, [live, dead], health_checks={
            "interval_seconds": 0.05, "unhealthy_threshold": 1}) as (client, key):
        states = await wait_for(client, lambda states: not states[dead]["is_healthy"])
        assert list(states) == [live, dead]                    # config order
        assert states[live] == untroubled(live)
        assert states[dead]["num_failed_health_checks"] >= 1
        assert states[dead]["circuit"] == "closed" and states[dead]["recent_failures"] == []

        for _ in range(4):
            answer = await client.post("/v1/chat/completions", json=CHAT,
                                       headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
        states = await upstreams(client)
        assert states[live] == untroubled(live)
        assert states[dead]["recent_failures"] == [] and states[dead]["num_outstanding"] == 0


async def test_a_dead_replica_shows_its_open_circuit_and_recent_failures(
        tmp_path: Path, live: str, dead: str):
    async with gateway(tmp_path, [live, dead], health_checks={"enabled": False},
                       circuit_breaker={"failure_threshold": 1, "reset_seconds": 600},
                       retries={"max_attempts": 2, "backoff_base_seconds": 0.01}) as (
            client, key):
        for _ in range(64):  # each call tries one of the two at random first
            answer = await client.post("/v1/chat/completions", json=CHAT,
                                       headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text  # retried on the live one
            states = await upstreams(client)
            if states[dead]["circuit"] == "open":
                break
        assert states[live] == untroubled(live)
        dead_state = states[dead]
        assert dead_state["circuit"] == "open"
        assert 0 < dead_state["circuit_retry_in_s"] <= 600
        assert dead_state["num_consecutive_failures"] == 1
        [failure] = dead_state["recent_failures"]
        assert failure["outcome"] == "connect_error" and failure["seconds_ago"] >= 0
        assert dead_state["num_outstanding"] == 0 and dead_state["is_healthy"]
