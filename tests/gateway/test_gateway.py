"""The gateway end to end: a `quiver gateway` process in front of two real tiny-model
servers, called with the official `openai` SDK and raw httpx."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import GatewayProcess, create_key, start_gateway

ADMIN_KEY = "admin-secret-for-tests"
REFRESH_S = 0.2
MESSAGES = [{"role": "user", "content": "Name three rivers."}]
# Tests that count tokens ignore EOS: the tiny model samples at temperature 1 and can draw its
# EOS early (a completion of 3 tokens stopped at 2 in a CI-like run, 2026-12-06).
NO_EOS = {"ignore_eos": True}


@dataclass
class Stack:
    gateway: GatewayProcess
    store: str
    clients: list[openai.OpenAI] = field(default_factory=list)  # closed with the stack

    def key(self, name: str, **fields) -> str:
        secret = create_key(self.store, name, **fields)
        time.sleep(REFRESH_S * 4)  # the gateway reloads keys every REFRESH_S
        return secret

    def client(self, key: str, base_url: str | None = None) -> openai.OpenAI:
        # closed when the stack stops: a client left to the garbage collector closes its
        # pooled socket with a ResourceWarning in whatever test runs then
        client = openai.OpenAI(base_url=base_url or f"{self.gateway.url}/v1", api_key=key,
                               max_retries=0)
        self.clients.append(client)
        return client

    def post(self, key: str | None, body: dict, **headers: str) -> httpx.Response:
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(f"{self.gateway.url}/v1/chat/completions", json=body,
                          headers=headers, timeout=60)


@pytest.fixture(scope="module")
def stack(tiny_servers, tmp_path_factory) -> Stack:
    workdir: Path = tmp_path_factory.mktemp("gateway")
    store = str(workdir / "keys.db")
    config = {
        "key_store": store, "admin_key": ADMIN_KEY, "key_refresh_seconds": REFRESH_S,
        "max_body_bytes": 65536,
        "models": [{"name": "tiny", "variants": [
            {"name": "stable", "weight": 100, "replicas": [s.url for s in tiny_servers]}]}],
        "health_checks": {"interval_seconds": 0.5},
    }
    gateway = start_gateway(config, workdir)
    stack = Stack(gateway, store)
    yield stack
    for client in stack.clients:
        client.close()
    gateway.stop()


def chat(client: openai.OpenAI, **kwargs):
    params = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    return client.chat.completions.with_raw_response.create(**{**params, **kwargs})


def test_chat_through_the_gateway_with_the_openai_sdk(stack):
    client = stack.client(stack.key("sdk-user"))
    raw = chat(client, temperature=1.0)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 8
    assert raw.headers["x-quiver-variant"] == "stable"
    assert raw.headers["x-quiver-cache"] == "bypass"   # temperature 1, no seed
    assert raw.headers["x-request-id"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_stream_passes_through_with_usage_only_when_asked(stack, tiny_servers):
    client = stack.client(stack.key("streamer"))
    with_usage = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS))
    assert with_usage[-1].usage.completion_tokens == 6 and with_usage[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in with_usage if c.choices)
    assert text
    without = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, stream=True,
        extra_body=NO_EOS))
    assert all(c.choices for c in without)          # the usage-only chunk was dropped
    assert without[-1].choices[0].finish_reason == "length"
    # and the chunks have the shape the model server gives when usage is not asked for
    direct = stack.client("x", base_url=f"{tiny_servers[0].url}/v1").chat.completions
    plain = list(direct.create(model="tiny", messages=MESSAGES, max_tokens=6, stream=True))
    assert {frozenset(c.model_dump(exclude_unset=True)) for c in without} == {
        frozenset(c.model_dump(exclude_unset=True)) for c in plain}
    assert all("usage" not in c.model_dump(exclude_unset=True) for c in without)


def test_n_choices_stream_through(stack):
    client = stack.client(stack.key("many"))
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, n=2, temperature=1.0, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage.completion_tokens == 8


def test_completions_endpoint_and_model_lookup(stack):
    client = stack.client(stack.key("legacy"))
    completion = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3,
                                           extra_body=NO_EOS)
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("absent")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/chat/completions", 405), ("POST", "/v1/audio/speech", 404),
    ("GET", "/nowhere", 404)])
def test_unknown_routes_and_methods_answer_in_openai_shape(stack, method, path, status):
    key = stack.key(f"lost-{status}-{path.count('/')}")
    response = httpx.request(method, f"{stack.gateway.url}{path}", timeout=30,
                             headers={"authorization": f"Bearer {key}"})
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_stream_response_headers_say_no_buffering(stack):
    key = stack.key("stream-headers")
    with httpx.stream("POST", f"{stack.gateway.url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                            "stream": True}) as response:
        body = b"".join(response.iter_bytes())
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("authorization", [None, "Bearer qk-not-a-real-key", "Basic abc"])
def test_missing_or_invalid_key_is_401_in_openai_shape(stack, authorization):
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.post(f"{stack.gateway.url}/v1/chat/completions", headers=headers,
                          json={"model": "tiny", "messages": MESSAGES}, timeout=30)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] in {"invalid_api_key", "missing_api_key"}
    with pytest.raises(openai.AuthenticationError):
        stack.client("qk-wrong").chat.completions.create(model="tiny", messages=MESSAGES)


def test_model_not_allowed_is_403(stack):
    key = stack.key("other-models-only", models=("some-other-model",))
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(stack.client(key))
    assert exc.value.body["code"] == "model_not_allowed"
    assert stack.client(key).models.list().data == []


def test_unknown_model_is_404_and_bad_json_400(stack):
    key = stack.key("typo")
    with pytest.raises(openai.NotFoundError):
        stack.client(key).chat.completions.create(model="nope", messages=MESSAGES)
    response = httpx.post(f"{stack.gateway.url}/v1/chat/completions", content=b"{not json",
                          headers={"authorization": f"Bearer {key}",
                                   "content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(stack):
    key = stack.key("big")
    response = stack.post(key, {"model": "tiny", "messages": [
        {"role": "user", "content": "x" * 70_000}]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_rate_limit_429_with_headers(stack):
    key = stack.key("limited", rpm=2, tpm=100_000)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "temperature": 1.0}
    first = stack.post(key, body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert stack.post(key, body).status_code == 200
    refused = stack.post(key, body)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        chat(stack.client(key))


def test_token_budget_runs_out(stack):
    key = stack.key("budget", budget_tokens=30)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0}
    statuses = [stack.post(key, body).status_code for _ in range(6)]
    assert statuses[0] == 200 and statuses[-1] == 429
    refused = stack.post(key, body)
    assert refused.json()["error"]["code"] == "insufficient_quota"


def test_concurrent_calls_cannot_overspend_a_budget(stack):
    import concurrent.futures

    budget = 120
    key = stack.key("tight-budget", budget_tokens=budget)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: stack.post(key, body), range(8)))
    used = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
    assert 0 < used <= budget
    assert {r.status_code for r in responses} == {200, 429}


def test_revoked_key_is_refused_within_a_second(stack, tmp_path):
    import subprocess
    import sys

    key = stack.key("short-lived")
    assert chat(stack.client(key)).http_response.status_code == 200
    result = subprocess.run([sys.executable, "-m", "quiver", "keys", "revoke", "short-lived",
                             "--store", stack.store], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError):
        chat(stack.client(key))


def test_cache_hit_miss_bypass_and_directives(stack):
    key = stack.key("cache-user")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "cache me"}],
            "max_tokens": 6, "temperature": 0}
    first, second = stack.post(key, body), stack.post(key, body)
    assert first.headers["x-quiver-cache"] == "miss"
    assert second.headers["x-quiver-cache"] == "hit"
    assert second.content == first.content
    assert second.headers["x-quiver-variant"] == "stable"
    assert stack.post(key, body, **{"cache-control": "no-cache"}).headers[
        "x-quiver-cache"] == "miss"
    other = {**body, "messages": [{"role": "user", "content": "do not keep me"}]}
    assert stack.post(key, other, **{"cache-control": "no-store"}).headers[
        "x-quiver-cache"] == "miss"
    assert stack.post(key, other).headers["x-quiver-cache"] == "miss"  # was not stored
    assert stack.post(key, {**body, "seed": 7, "temperature": 1.0}).headers[
        "x-quiver-cache"] == "miss"
    assert stack.post(key, {**body, "temperature": 0.8}).headers["x-quiver-cache"] == "bypass"


def test_cache_keys_by_variant_and_checks_pinning_first(stack):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "pinned"}],
            "max_tokens": 4, "temperature": 0}
    pinner = stack.key("pinner", can_pin_variant=True)
    assert stack.post(pinner, body).headers["x-quiver-cache"] == "miss"
    # entries are keyed by the variant that answers: pinning the one that served is a hit
    pinned = stack.post(pinner, body, **{"x-quiver-variant": "stable"})
    assert pinned.headers["x-quiver-cache"] == "hit"
    assert pinned.headers["x-quiver-variant"] == "stable"
    other = stack.key("no-pinning", owner="shared-tenant")
    stack.post(other, body)                                   # cached for this tenant
    refused = stack.post(other, body, **{"x-quiver-variant": "stable"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "variant_pinning_not_allowed"


def test_cache_never_crosses_tenants(stack):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "mine"}],
            "max_tokens": 4, "temperature": 0}
    alice, bob = stack.key("alice"), stack.key("bob")
    assert stack.post(alice, body).headers["x-quiver-cache"] == "miss"
    assert stack.post(alice, body).headers["x-quiver-cache"] == "hit"
    assert stack.post(bob, body).headers["x-quiver-cache"] == "miss"


def test_streamed_cache_hit_replays_a_valid_sse_stream(stack):
    client = stack.client(stack.key("stream-cache"))
    params = {"model": "tiny", "messages": [{"role": "user", "content": "stream cache"}],
              "max_tokens": 6, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    first = client.chat.completions.with_raw_response.create(**params)
    chunks_first = list(first.parse())
    second = client.chat.completions.with_raw_response.create(**params)
    chunks_second = list(second.parse())
    assert first.headers["x-quiver-cache"] == "miss"
    assert second.headers["x-quiver-cache"] == "hit"
    assert [c.model_dump() for c in chunks_second] == [c.model_dump() for c in chunks_first]
    assert chunks_second[-1].usage.completion_tokens == 6


def test_keys_never_reach_logs_or_metrics(stack):
    key = stack.key("secretive")
    chat(stack.client(key), temperature=1.0)
    httpx.post(f"{stack.gateway.url}/v1/chat/completions", json={"model": "tiny"},
               headers={"authorization": "Bearer qk-leaked-attempt"}, timeout=30)
    metrics = httpx.get(f"{stack.gateway.url}/metrics", timeout=30,
                        headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    assert ('quiver_gateway_requests_total{key="secretive",model="tiny",status="200",'
            'variant="stable"}') in metrics
    assert 'quiver_gateway_tokens_total{key="secretive"' in metrics
    for secret in (key, "qk-leaked-attempt"):
        assert secret not in metrics
        assert secret not in stack.gateway.log


def test_admin_api_creates_and_revokes_keys(stack):
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    url = f"{stack.gateway.url}/admin/keys"
    assert httpx.get(url, timeout=30).status_code == 401
    created = httpx.post(url, headers=admin, json={"name": "from-admin", "rpm": 60},
                         timeout=30)
    assert created.status_code == 201
    secret = created.json()["key"]
    time.sleep(REFRESH_S * 4)
    assert chat(stack.client(secret), temperature=1.0).http_response.status_code == 200
    names = [k["name"] for k in httpx.get(url, headers=admin, timeout=30).json()["data"]]
    assert "from-admin" in names
    assert httpx.delete(f"{url}/from-admin", headers=admin, timeout=30).status_code == 200
    time.sleep(REFRESH_S * 4)
    with pytest.raises(openai.AuthenticationError):
        chat(stack.client(secret))
    routes = httpx.get(f"{stack.gateway.url}/admin/routes", headers=admin, timeout=30).json()
    stable = routes["tiny"]["variants"]["stable"]
    assert stable["weight"] == 100 and stable["window"]["samples"] > 0
    assert not stable["rolled_back"]
