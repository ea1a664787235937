"""Fallback models, end to end through a real gateway process: each cause (a dead replica, a
5xx, a timeout, a prompt over a real model server's context), streams before and after
their first byte, the `x-quiver-fallback` header, the metric, and charging once."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import ConfigError, load_settings
from tests.gateway.conftest import create_key, free_port, start_gateway, start_model_server

ADMIN = "admin-key-for-fallback-tests"
MESSAGES = [{"role": "user", "content": "hello"}]
# primaries, each failing its own way, all falling back to `backup`
PRIMARIES = {"dead": {}, "err500": {"mode": "fail500"}, "err503": {"mode": "fail503"},
             "slow": {"mode": "hang"}, "breaks": {"mode": "die_mid_stream", "die_after": 2},
             "picky": {"mode": "bad_request"}}


def route(name: str, url: str, **extra) -> dict:
    return {"name": name, "variants": [{"name": "stable", "weight": 100, "replicas": [url]}],
            **extra}


def post(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {key}"})


def stream(url: str, key: str, body: dict) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                      headers={"authorization": f"Bearer {key}"}, timeout=60) as response:
        raw = b"".join(response.iter_bytes())
    return response, [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e.strip()]


def samples(gateway_url: str, name: str) -> dict[frozenset, float]:
    text = httpx.get(f"{gateway_url}/metrics", timeout=10,
                     headers={"authorization": f"Bearer {ADMIN}"}).text
    return {frozenset(s.labels.items()): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def fallbacks_counted(gateway_url: str, model: str, reason: str) -> float:
    found = samples(gateway_url, "quiver_gateway_fallbacks_total")
    return found.get(frozenset({"model": model, "fallback": "backup",
                                "reason": reason}.items()), 0.0)


class Stack:
    def __init__(self, url: str, key: str, fakes: dict) -> None:
        self.url, self.key, self.fakes = url, key, fakes


@pytest.fixture(scope="module")
def stack(fake_upstreams_module, tmp_path_factory) -> Stack:
    tmp_path = tmp_path_factory.mktemp("fallbacks")
    fakes = {name: fake_upstreams_module(name, **flags) for name, flags in PRIMARIES.items()
             if name != "dead"}
    fakes["backup"] = fake_upstreams_module("backup")
    urls = {name: fake.url for name, fake in fakes.items()}
    urls["dead"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    models = [route(name, urls[name], fallbacks=["backup"]) for name in PRIMARIES]
    models.append(route("backup", urls["backup"],
                        variants=[{"name": "stable", "weight": 100, "replicas": [urls["backup"]],
                                   "upstream_model": "backup-upstream"}]))
    store = str(tmp_path / "keys.db")
    key = create_key(store, "falls")
    gateway = start_gateway({"key_store": store, "admin_key": ADMIN, "models": models,
                             "timeouts": {"first_byte_seconds": 0.5},
                             "retries": {"max_attempts": 2, "backoff_base_seconds": 0.01},
                             "health_checks": {"interval_seconds": 0.5}}, tmp_path)
    try:
        yield Stack(gateway.url, key, fakes)
    finally:
        gateway.stop()


@pytest.mark.parametrize(("model", "reason"), [("dead", "unavailable"), ("err500", "error"),
                                                ("err503", "error"), ("slow", "timeout")])
def test_a_failing_model_falls_back_with_header_metric_and_rewritten_model(stack, model,
                                                                           reason):
    before = fallbacks_counted(stack.url, model, reason)
    seen_before = stack.fakes["backup"].stats()["num_requests"]
    response = post(stack.url, stack.key, {"model": model, "messages": MESSAGES})
    assert response.status_code == 200, response.text
    assert response.headers["x-quiver-fallback"] == "backup"
    assert response.json()["choices"][0]["message"]["content"] == "hi from backup"
    backup = stack.fakes["backup"].stats()
    assert backup["num_requests"] == seen_before + 1
    assert backup["last_body"]["model"] == "backup-upstream"   # rewritten for the fallback
    assert fallbacks_counted(stack.url, model, reason) == before + 1


@pytest.mark.parametrize(("model", "reason"), [("dead", "unavailable"), ("err500", "error")])
def test_a_stream_falls_back_before_its_first_byte(stack, model, reason):
    before = fallbacks_counted(stack.url, model, reason)
    response, events = stream(stack.url, stack.key, {"model": model, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.headers["x-quiver-fallback"] == "backup"
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["model"] == "backup-upstream"
    assert fallbacks_counted(stack.url, model, reason) == before + 1


def test_a_stream_that_broke_after_its_first_byte_does_not_fall_back(stack):
    seen_before = stack.fakes["backup"].stats()["num_requests"]
    response, events = stream(stack.url, stack.key, {"model": "breaks", "messages": MESSAGES})
    assert response.status_code == 200
    assert "x-quiver-fallback" not in response.headers
    assert json.loads(events[0])["model"] == "breaks"            # the routed model's tokens
    assert json.loads(events[-1])["error"]["type"] == "upstream_error"
    assert stack.fakes["backup"].stats()["num_requests"] == seen_before
    counted = samples(stack.url, "quiver_gateway_fallbacks_total")
    assert sum(v for labels, v in counted.items() if ("model", "breaks") in labels) == 0


def test_the_clients_own_error_does_not_fall_back(stack):
    seen_before = stack.fakes["backup"].stats()["num_requests"]
    response = post(stack.url, stack.key, {"model": "picky", "messages": MESSAGES})
    assert response.status_code == 400
    assert "x-quiver-fallback" not in response.headers
    assert stack.fakes["backup"].stats()["num_requests"] == seen_before


def test_usage_is_charged_once_to_the_model_that_answered(stack):
    post(stack.url, stack.key, {"model": "err500", "messages": MESSAGES})
    tokens = samples(stack.url, "quiver_gateway_tokens_total")
    models = {dict(labels)["model"] for labels in tokens}
    assert "backup" in models and "err500" not in models
    requests = samples(stack.url, "quiver_gateway_requests_total")
    assert not any(dict(labels)["model"] == "err500" for labels in requests)


def test_a_prompt_over_a_real_servers_context_falls_back(tiny_model_dir: Path, tiny_servers,
                                                         tmp_path):
    small = start_model_server(tiny_model_dir, "tiny-small", None, "--max-model-len", "48")
    store = str(tmp_path / "keys.db")
    key = create_key(store, "long")
    models = [route("small", small.url, fallbacks=["backup"],
                    variants=[{"name": "stable", "weight": 100, "upstream_model": "tiny-small",
                               "replicas": [small.url]}]),
              route("backup", tiny_servers[0].url,
                    variants=[{"name": "stable", "weight": 100, "upstream_model": "tiny",
                               "replicas": [tiny_servers[0].url]}])]
    gateway = start_gateway({"key_store": store, "admin_key": ADMIN, "models": models},
                            tmp_path)
    long_prompt = [{"role": "user", "content": "tell me a long story " * 30}]
    try:
        direct = httpx.post(f"{small.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-small", "messages": long_prompt, "max_tokens": 4})
        assert direct.status_code == 400                        # the real server's refusal
        short = post(gateway.url, key, {"model": "small", "messages": MESSAGES,
                                        "max_tokens": 4})
        assert short.status_code == 200 and "x-quiver-fallback" not in short.headers
        answer = post(gateway.url, key, {"model": "small", "messages": long_prompt,
                                         "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-quiver-fallback"] == "backup"
        assert answer.json()["model"] == "tiny"
        response, events = stream(gateway.url, key, {"model": "small",
                                                     "messages": long_prompt, "max_tokens": 4})
        assert response.headers["x-quiver-fallback"] == "backup" and events[-1] == "[DONE]"
        counted = samples(gateway.url, "quiver_gateway_fallbacks_total")
        assert counted[frozenset({"model": "small", "fallback": "backup",
                                  "reason": "context_length"}.items())] == 2
    finally:
        gateway.stop()
        small.kill()


@pytest.mark.parametrize(("fallbacks", "message"), [
    ({"a": ["a"]}, "name the model itself"),
    ({"a": ["nope"]}, "not a configured model"),
    ({"a": ["b"], "b": ["a"]}, "cycle: a -> b -> a"),
])
def test_bad_fallbacks_fail_config_validation(tmp_path, fallbacks, message):
    models = [route(name, "http://127.0.0.1:9", fallbacks=fallbacks.get(name, []))
              for name in ("a", "b")]
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"models": models}), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_settings(config)

