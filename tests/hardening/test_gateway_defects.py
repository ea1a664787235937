"""Gateway defects of issue #17, each against real processes: estimates that undercount,
the cache ignoring the variant, /ready with a dead stable, deep JSON, lone surrogates,
/metrics on the public port, and trailing-slash redirects built from the Host header."""

from __future__ import annotations

import httpx
import pytest

from gateway.routing.router import rendezvous_score
from tests.hardening.conftest import (
    ADMIN,
    GatewayProcess,
    free_port,
    gateway_config,
    new_key,
    start_gateway,
    wait_for,
)

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def stack(tiny_server, fake_upstreams_module, tmp_path_factory):
    """`tiny` (stable: the tiny model, canary: a fake, 50/50) and `tiny-ctx` (the tiny
    model with a configured 600-token context)."""
    workdir = tmp_path_factory.mktemp("defects")
    canary = fake_upstreams_module("canary")
    store = str(workdir / "keys.db")
    config = gateway_config(store, [tiny_server.url])
    config["models"] = [
        {"name": "tiny", "variants": [
            {"name": "stable", "weight": 50, "replicas": [tiny_server.url]},
            {"name": "canary", "weight": 50, "replicas": [canary.url],
             "upstream_model": "tiny"}]},
        {"name": "tiny-ctx", "max_context_tokens": 600, "variants": [
            {"name": "stable", "weight": 100, "replicas": [tiny_server.url],
             "upstream_model": "tiny"}]}]
    gateway = start_gateway(config, workdir)
    gateway.store = store  # type: ignore[attr-defined]
    wait_for(lambda: all(state["max_model_len"] for state in httpx.get(
        f"{gateway.url}/admin/upstreams", timeout=5,
        headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
        if state["variant"] == "stable"), 20, "the replicas' context lengths")
    yield gateway
    gateway.stop()


def user_on(variant: str) -> str:
    """A `user` the router sends to `variant` of `tiny` at 50/50."""
    for i in range(1000):
        user = f"user-{i}"
        scores = {v: rendezvous_score(user, "tiny", v, 50.0) for v in ("stable", "canary")}
        if min(scores, key=scores.__getitem__) == variant:
            return user
    raise AssertionError("no user found")


def post(gateway: GatewayProcess, key: str, body: dict, path: str = "/v1/chat/completions",
         **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=60,
                      headers={"authorization": f"Bearer {key}", **headers})


def refused_for_budget(response: httpx.Response) -> bool:
    return response.status_code == 429 and response.json()["error"]["code"] == "insufficient_quota"


# -- item 4 / #16.6: the up-front estimate ------------------------------------------------

def test_every_prompt_of_a_completions_call_times_n_is_reserved(stack):
    key = new_key(stack, stack.store, "many-prompts", budget_tokens=300)
    body = {"model": "tiny-ctx", "prompt": ["x" * 40] * 4, "n": 2, "max_tokens": 40}
    assert refused_for_budget(post(stack, key, body, "/v1/completions"))  # 4x11 + 4x40x2
    assert post(stack, key, {**body, "prompt": "x" * 40}, "/v1/completions").status_code == 200


def test_without_max_tokens_the_estimate_runs_to_the_context(stack):
    key = new_key(stack, stack.store, "open-ended", budget_tokens=1500)
    # the tiny model's /v1/models says max_model_len 2048: more than the budget
    refused = post(stack, key, {"model": "tiny", "messages": MESSAGES,
                                "user": user_on("stable")})
    assert refused_for_budget(refused)
    assert "2048" in refused.json()["error"]["message"]
    # tiny-ctx is configured with 600: it fits
    assert post(stack, key, {"model": "tiny-ctx", "messages": MESSAGES}).status_code == 200


def test_tools_and_response_formats_count_as_prompt_tokens(stack):
    key = new_key(stack, stack.store, "tool-user", budget_tokens=800)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "d" * 4000,
                                               "parameters": {"type": "object"}}}]
    body = {"model": "tiny-ctx", "messages": MESSAGES, "max_tokens": 5}
    assert refused_for_budget(post(stack, key, {**body, "tools": tools}))
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "description": "d" * 4000}}}
    assert refused_for_budget(post(stack, key, {**body, "response_format": schema}))


# -- item 12 / #16.6: the response cache ----------------------------------------------------

def test_the_cache_never_serves_one_variants_answer_for_another(stack):
    key = new_key(stack, stack.store, "cached", owner="one-tenant")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    first = post(stack, key, {**body, "user": user_on("stable")})
    assert first.headers["x-quiver-variant"] == "stable"
    assert first.headers["x-quiver-cache"] == "miss"
    second = post(stack, key, {**body, "user": user_on("canary")})  # same tenant and body
    assert second.headers["x-quiver-variant"] == "canary"
    assert second.headers["x-quiver-cache"] == "miss"
    assert second.json()["choices"][0]["message"]["content"] == "hi from canary"
    again = post(stack, key, {**body, "user": user_on("canary")})
    assert again.headers["x-quiver-cache"] == "hit"
    assert again.json() == second.json()


@pytest.mark.parametrize("field,values", [
    ("tools", [[{"type": "function", "function": {"name": "a"}}],
               [{"type": "function", "function": {"name": "b"}}]]),
    ("tool_choice", ["auto", "none"]),
    ("response_format", [{"type": "json_object"}, {"type": "text"}]),
    ("structured_outputs", [{"choice": ["a", "b"]}, {"regex": "[0-9]+"}]),
    ("logit_bias", [{"5": 10}, {"5": -10}]),
])
def test_every_output_changing_field_is_in_the_cache_key(stack, field, values):
    key = new_key(stack, stack.store, f"fields-{field}", can_pin_variant=True)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    pinned = {"x-quiver-variant": "canary"}  # the fake takes any field
    for value in values:
        assert post(stack, key, {**body, field: value}, **pinned).headers[
            "x-quiver-cache"] == "miss"
        assert post(stack, key, {**body, field: value}, **pinned).headers[
            "x-quiver-cache"] == "hit"
    assert post(stack, key, body, **pinned).headers["x-quiver-cache"] == "miss"


# -- item 9 and bad text: refused at the door, no traceback ------------------------------------

def test_json_nested_10000_deep_is_a_400_without_a_traceback(stack):
    key = new_key(stack, stack.store, "nester")
    deep = '{"model":"tiny","messages":' + "[" * 10_000 + "]" * 10_000 + "}"
    response = httpx.post(f"{stack.url}/v1/chat/completions", content=deep, timeout=30,
                          headers={"authorization": f"Bearer {key}",
                                   "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "json_too_deep"
    assert "Traceback" not in stack.log and "RecursionError" not in stack.log


def test_a_lone_surrogate_is_a_400_not_a_server_error(stack):
    key = new_key(stack, stack.store, "surrogate")
    raw = '{"model":"tiny-ctx","prompt":"\\ud800 hello","max_tokens":3}'
    response = httpx.post(f"{stack.url}/v1/completions", content=raw, timeout=30,
                          headers={"authorization": f"Bearer {key}",
                                   "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_unicode"
    paired = raw.replace("\\ud800", "\\ud83d\\ude00")  # an emoji is fine
    assert httpx.post(f"{stack.url}/v1/completions", content=paired, timeout=30, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"}).status_code == 200


# -- item 10 and the Host header ---------------------------------------------------------------

def test_metrics_on_the_public_port_need_the_admin_key(stack):
    assert httpx.get(f"{stack.url}/metrics", timeout=10).status_code == 401
    key = new_key(stack, stack.store, "nosy")
    assert httpx.get(f"{stack.url}/metrics", timeout=10,
                     headers={"authorization": f"Bearer {key}"}).status_code == 401
    scraped = httpx.get(f"{stack.url}/metrics", timeout=10,
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert scraped.status_code == 200 and "quiver_gateway_requests_total" in scraped.text


def test_prometheus_reads_metrics_on_their_own_port_and_nothing_else(fake_upstreams,
                                                                      tmp_path):
    upstream = fake_upstreams("fast")
    metrics_port = free_port()
    config = gateway_config(str(tmp_path / "keys.db"), [upstream.url],
                            metrics_port=metrics_port)
    config.pop("admin_key")  # no admin key: the API port serves no /metrics at all
    gateway = start_gateway(config, tmp_path)
    try:
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "quiver_gateway_upstream_healthy" in scraped.text
        for path in ("/v1/models", "/admin/keys", "/health"):
            assert httpx.get(f"http://127.0.0.1:{metrics_port}{path}",
                             timeout=10).status_code == 404
        assert httpx.get(f"{gateway.url}/metrics", timeout=10).status_code == 404
    finally:
        gateway.stop()


def test_no_redirect_is_built_from_the_host_header(stack):
    for path in ("/health/", "/v1/models/", "/v1/chat/completions/"):
        response = httpx.request("POST" if "chat" in path else "GET", f"{stack.url}{path}",
                                 headers={"host": "evil.example"}, timeout=10)
        assert "evil.example" not in response.headers.get("location", "")
        assert response.status_code in (401, 404, 405)


# -- item 7 -------------------------------------------------------------------------------------

def test_ready_needs_every_models_stable_variant(fake_upstreams, tmp_path):
    canary = fake_upstreams("canary")
    config = gateway_config(str(tmp_path / "keys.db"), [])
    config["models"] = [{"name": "tiny", "variants": [
        {"name": "stable", "weight": 50, "replicas": ["http://127.0.0.1:9"]},  # nothing there
        {"name": "canary", "weight": 50, "replicas": [canary.url]}]}]
    gateway = start_gateway(config, tmp_path)
    try:
        admin = {"authorization": f"Bearer {ADMIN}"}

        def canary_checked() -> bool:
            states = httpx.get(f"{gateway.url}/admin/upstreams", headers=admin,
                               timeout=5).json()["data"]
            return any(s["variant"] == "canary" and s["is_healthy"] for s in states) and any(
                s["variant"] == "stable" and s["num_failed_health_checks"] >= 2
                for s in states)

        wait_for(canary_checked, 10, "health checks of both variants")
        assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503
    finally:
        gateway.stop()
