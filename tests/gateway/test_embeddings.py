"""`/v1/embeddings` through the gateway (issue #16, item 4, gateway side) exactly like the
chat and completions routes: auth, model permissions, rate limits and budgets (the
estimate is the input), metrics and the response cache, with the official `openai` SDK
against a fake upstream that speaks OpenAI's embeddings format."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.gateway.conftest import create_key, start_gateway

ADMIN = "admin-key-for-embedding-tests"


@pytest.fixture(scope="module")
def stack(fake_upstreams_module, tmp_path_factory):
    upstream = fake_upstreams_module("embedder")
    workdir = tmp_path_factory.mktemp("embeddings")
    store = str(workdir / "keys.db")
    config = {"key_store": store, "admin_key": ADMIN, "key_refresh_seconds": 0.2,
              "models": [{"name": "tiny", "variants": [
                  {"name": "stable", "weight": 100, "replicas": [upstream.url]}]},
                         {"name": "other", "variants": [
                  {"name": "stable", "weight": 100, "replicas": [upstream.url]}]}]}
    gateway = start_gateway(config, workdir)
    gateway.store, gateway.upstream = store, upstream  # type: ignore[attr-defined]
    gateway.clients = []  # type: ignore[attr-defined]
    yield gateway
    for sdk in gateway.clients:  # type: ignore[attr-defined]
        sdk.close()
    gateway.stop()


def key(stack, name: str, **fields) -> str:
    secret = create_key(stack.store, name, **fields)
    time.sleep(0.8)  # the gateway reloads keys every 0.2 s
    return secret


def client(stack, secret: str) -> openai.OpenAI:
    """Closed with the stack (left to the garbage collector, its socket would close with a
    ResourceWarning in whatever test runs then)."""
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=secret, max_retries=0)
    stack.clients.append(sdk)
    return sdk


def post(stack, secret: str | None, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(f"{stack.url}/v1/embeddings", json=body, headers=headers, timeout=30)


def test_embeddings_with_the_openai_sdk(stack):
    sdk = client(stack, key(stack, "embedder-user"))
    raw = sdk.embeddings.with_raw_response.create(
        model="tiny", input=["first text", "second text"], dimensions=4, user="u-1")
    result = raw.parse()   # the SDK asks for base64 and decodes it
    assert [len(item.embedding) for item in result.data] == [4, 4]
    assert result.usage.prompt_tokens > 0
    assert raw.headers["x-quiver-variant"] == "stable"
    sent = stack.upstream.stats()["last_body"]
    assert sent["dimensions"] == 4 and sent["user"] == "u-1"
    assert sent["encoding_format"] == "base64"
    floats = sdk.embeddings.create(model="tiny", input=[1, 2, 3], encoding_format="float")
    assert len(floats.data) == 1 and isinstance(floats.data[0].embedding[0], float)


def test_auth_and_model_permissions(stack):
    assert post(stack, None, {"model": "tiny", "input": "x"}).status_code == 401
    narrow = key(stack, "only-other", models=("other",))
    refused = post(stack, narrow, {"model": "tiny", "input": "x"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert post(stack, narrow, {"model": "other", "input": "x"}).status_code == 200


@pytest.mark.parametrize("bad_input", [None, "", [], [1, "a"], {"text": "x"}, [[]], True])
def test_input_must_be_openais_shape(stack, bad_input):
    body = {"model": "tiny"} if bad_input is None else {"model": "tiny", "input": bad_input}
    response = post(stack, key(stack, f"bad-{abs(hash(repr(bad_input))) % 10**6}"), body)
    if bad_input == "":  # an empty string is a string: the model server's to judge
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"


def test_budget_estimate_is_the_input_and_usage_is_charged(stack):
    secret = key(stack, "budgeted", budget_tokens=150)
    refused = post(stack, secret, {"model": "tiny", "input": "x" * 800})  # ~201 tokens
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    answered = post(stack, secret, {"model": "tiny", "input": "x" * 200})
    assert answered.status_code == 200
    charged = answered.json()["usage"]["prompt_tokens"]

    def used() -> int:
        keys = httpx.get(f"{stack.url}/admin/keys", timeout=10,
                         headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
        return next(k["used_tokens"] for k in keys if k["name"] == "budgeted")

    deadline = time.monotonic() + 10
    while used() != charged and time.monotonic() < deadline:
        time.sleep(0.1)
    assert used() == charged


def test_rate_limits_apply(stack):
    secret = key(stack, "limited-embedder", rpm=2)
    statuses = [post(stack, secret, {"model": "tiny", "input": f"t{i}"}) for i in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[0].headers["x-ratelimit-limit-requests"] == "2"
    assert statuses[2].headers["retry-after"]


def test_embeddings_are_cached_without_a_seed_or_temperature(stack):
    secret = key(stack, "cached-embedder")
    body = {"model": "tiny", "input": ["cache me"], "encoding_format": "float"}
    first, second = post(stack, secret, body), post(stack, secret, body)
    assert (first.headers["x-quiver-cache"], second.headers["x-quiver-cache"]) == ("miss", "hit")
    assert second.json() == first.json()
    other = post(stack, secret, {**body, "dimensions": 3})
    assert other.headers["x-quiver-cache"] == "miss"


def test_embeddings_are_in_the_metrics(stack):
    post(stack, key(stack, "counted"), {"model": "tiny", "input": "count me"})
    text = httpx.get(f"{stack.url}/metrics", timeout=10,
                     headers={"authorization": f"Bearer {ADMIN}"}).text
    assert 'quiver_gateway_http_requests_total{method="POST",route="/v1/embeddings"' in text
    assert 'quiver_gateway_requests_total{key="counted",model="tiny",status="200"' in text
    assert 'quiver_gateway_tokens_total{key="counted",kind="prompt",model="tiny"' in text
