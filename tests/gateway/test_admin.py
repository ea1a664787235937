"""The `/admin` API on a tiny inline app: auth, key management, canary weights, the
upstreams listing, and OpenAI-shaped errors for every refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from common.errors import ApiError
from gateway.admin import build_admin_router
from gateway.errors import BadRequestError, NotFoundError, handle_api_error
from gateway.keys import KeyStore, hash_key, mint_key
from gateway.stores.sqlite_keys import SqliteKeyStore

ADMIN_KEY = "admin-secret-123"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


class FakeRoutes:
    """A routing table with one model and two variants, as the canary router exposes it."""

    def __init__(self) -> None:
        self.weights = {"tiny": {"stable": 90.0, "canary": 10.0},
                        "org/big": {"stable": 100.0}}

    def snapshot(self) -> dict[str, Any]:
        return {"models": [{"name": model, "variants": [
            {"name": name, "weight": weight} for name, weight in variants.items()]}
            for model, variants in self.weights.items()]}

    async def set_weight(self, model: str, variant: str, weight: float) -> None:
        if model not in self.weights:
            raise NotFoundError(f"no model {model!r}", param="model", code="model_not_found")
        if variant not in self.weights[model]:
            raise NotFoundError(f"no variant {variant!r}", param="variant")
        if weight == 0 and sum(w for v, w in self.weights[model].items() if v != variant) == 0:
            raise BadRequestError("at least one variant needs a weight above 0")
        self.weights[model][variant] = weight


class FakeUpstreams:
    """The pool's replica states, as `UpstreamPool.replica_states` gives them."""

    def replica_states(self) -> list[dict[str, Any]]:
        return [{"model": "tiny", "variant": "stable", "url": "http://10.0.0.1:8001",
                 "is_healthy": True, "circuit": "closed", "recent_failures": []}]


def make_app(admin_key: str | None, store: KeyStore, routes: FakeRoutes) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(ApiError, handle_api_error)
    app.include_router(build_admin_router(
        admin_key=None if admin_key is None else SecretStr(admin_key), key_store=store,
        routes=routes, upstreams=FakeUpstreams()))
    return app


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    opened = SqliteKeyStore(tmp_path / "keys.db")
    yield opened
    await opened.close()


@pytest.fixture
def routes() -> FakeRoutes:
    return FakeRoutes()


@pytest.fixture
async def client(store: KeyStore, routes: FakeRoutes) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(ADMIN_KEY, store, routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway") as http:
        yield http


def assert_openai_error(response: httpx.Response, status: int, *,
                        code: str | None = None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]["message"]


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY},
    {"Authorization": "Basic " + ADMIN_KEY}, {"Authorization": "Bearer "}])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/x"),
    ("GET", "/admin/routes"), ("PUT", "/admin/routes/tiny/canary"), ("GET", "/admin/upstreams"),
    ("GET", "/admin/nope")])
async def test_every_admin_path_needs_the_admin_key(client: httpx.AsyncClient, headers,
                                                    method: str, path: str):
    response = await client.request(method, path, headers=headers, json={"name": "x"})
    message = assert_openai_error(response, 401, code="invalid_api_key")
    assert ADMIN_KEY not in message
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/routes"),
    ("PUT", "/admin/routes/tiny/canary"), ("GET", "/admin/upstreams"), ("GET", "/admin"),
    ("GET", "/admin/anything")])
@pytest.mark.parametrize("admin_key", [None, ""])
async def test_admin_api_disabled_without_an_admin_key(store: KeyStore, routes: FakeRoutes,
                                                       admin_key, method: str, path: str):
    app = make_app(admin_key, store, routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway") as http:
        response = await http.request(method, path, headers=AUTH, json={"name": "x"})
    assert assert_openai_error(response, 404) == "the admin API is disabled"
    assert await store.list_keys() == []


async def test_create_key_returns_it_once_and_the_gateway_accepts_it(
        client: httpx.AsyncClient, store: KeyStore):
    response = await client.post("/admin/keys", headers=AUTH, json={
        "name": "svc", "models": ["tiny"], "rpm": 10, "tpm": 500, "budget_tokens": 9000,
        "owner": "tenant-a", "can_pin_variant": True, "max_concurrency": 4,
        "priority": "high"})
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    secret = body.pop("key")
    assert secret.startswith("qk-")
    assert body == {"name": "svc", "models": ["tiny"], "rpm": 10, "tpm": 500,
                    "budget_tokens": 9000, "used_tokens": 0, "owner": "tenant-a",
                    "can_pin_variant": True, "max_concurrency": 4, "priority": "high",
                    "created_at": body["created_at"],
                    "revoked_at": None, "metadata": {}}
    active = await store.active_keys()
    assert active[hash_key(secret)].name == "svc"
    assert active[hash_key(secret)].allows_model("tiny")
    assert not active[hash_key(secret)].allows_model("other")

    listing = await client.get("/admin/keys", headers=AUTH)
    assert listing.status_code == 200
    assert listing.json() == {"object": "list", "data": [body]}
    assert secret not in listing.text and hash_key(secret) not in listing.text


async def test_duplicate_name_is_a_400(client: httpx.AsyncClient):
    assert (await client.post("/admin/keys", headers=AUTH, json={"name": "a"})).status_code == 201
    response = await client.post("/admin/keys", headers=AUTH, json={"name": "a"})
    message = assert_openai_error(response, 400, code="key_name_taken", param="name")
    assert "'a' already exists" in message


@pytest.mark.parametrize(("body", "param"), [
    ({"name": "bad name"}, "name"),
    ({"name": "ok", "rpm": 0}, "rpm"),
    ({"name": "ok", "rpm": "10"}, "rpm"),
    ({"name": "ok", "tpm": 1.5}, "tpm"),
    ({"name": "ok", "can_pin_variant": "yes"}, "can_pin_variant"),
    ({"name": "ok", "models": "tiny"}, "models"),
    ({"name": "ok", "surprise": 1}, "surprise"),
    ({"name": "ok", "max_concurrency": 0}, "max_concurrency"),
    ({"name": "ok", "priority": "urgent"}, "priority"),
    ({}, "name"),
])
async def test_bad_create_body_is_a_400(client: httpx.AsyncClient, store: KeyStore,
                                        body: dict, param: str):
    response = await client.post("/admin/keys", headers=AUTH, json=body)
    message = assert_openai_error(response, 400, param=param)
    assert message.startswith(f"invalid request body: {param}")
    assert await store.list_keys() == []


async def test_non_json_body_is_a_400(client: httpx.AsyncClient):
    response = await client.post("/admin/keys", headers={**AUTH, "content-type": "text/plain"},
                                 content=b"name=x")
    assert "Invalid JSON" in assert_openai_error(response, 400)


async def test_revoke_key(client: httpx.AsyncClient, store: KeyStore):
    secret, key = mint_key("gone")
    await store.create(key)
    response = await client.delete("/admin/keys/gone", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"name": "gone", "revoked": True}
    assert await store.active_keys() == {}
    again = await client.delete("/admin/keys/gone", headers=AUTH)
    assert_openai_error(again, 404, code="key_not_found")

    revoked = await client.get("/admin/keys?include_revoked=true", headers=AUTH)
    [record] = revoked.json()["data"]
    assert record["name"] == "gone" and record["revoked_at"] is not None
    assert (await client.get("/admin/keys", headers=AUTH)).json()["data"] == []
    bad = await client.get("/admin/keys?include_revoked=maybe", headers=AUTH)
    assert_openai_error(bad, 400, param="include_revoked")


async def test_routes_snapshot_and_set_weight(client: httpx.AsyncClient, routes: FakeRoutes):
    response = await client.get("/admin/routes", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == routes.snapshot()

    updated = await client.put("/admin/routes/tiny/canary", headers=AUTH, json={"weight": 25})
    assert updated.status_code == 200
    assert routes.weights["tiny"]["canary"] == 25.0
    assert updated.json() == routes.snapshot()

    slashed = await client.put("/admin/routes/org/big/stable", headers=AUTH,
                               json={"weight": 50.5})
    assert slashed.status_code == 200
    assert routes.weights["org/big"]["stable"] == 50.5


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/admin/routes/tiny/canary", {"weight": 101}, 400, "weight"),
    ("/admin/routes/tiny/canary", {"weight": -1}, 400, "weight"),
    ("/admin/routes/tiny/canary", {"weight": "50"}, 400, "weight"),
    ("/admin/routes/tiny/canary", {}, 400, "weight"),
    ("/admin/routes/tiny/canary", {"weight": 5, "extra": True}, 400, "extra"),
    ("/admin/routes/nope/canary", {"weight": 5}, 404, "model"),
    ("/admin/routes/tiny/nope", {"weight": 5}, 404, "variant"),
    ("/admin/routes/org/big/stable", {"weight": 0}, 400, None),
])
async def test_bad_weight_changes_are_refused(client: httpx.AsyncClient, routes: FakeRoutes,
                                              path: str, body: dict, status: int, param):
    before = routes.snapshot()
    response = await client.put(path, headers=AUTH, json=body)
    assert_openai_error(response, status, param=param)
    assert routes.snapshot() == before


async def test_unknown_admin_path_is_an_openai_404(client: httpx.AsyncClient):
    response = await client.get("/admin/nothing-here", headers=AUTH)
    assert "no admin endpoint GET /admin/nothing-here" in assert_openai_error(response, 404)


async def test_upstreams_lists_the_pools_replica_states(client: httpx.AsyncClient):
    response = await client.get("/admin/upstreams", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": FakeUpstreams().replica_states()}

