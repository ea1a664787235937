"""Every gateway endpoint under generated traffic (hypothesis): odd methods and paths,
missing, wrong and right keys, odd headers, and bodies from valid OpenAI calls to deep,
huge, mistyped or non-JSON ones. The gateway answers each within the timeout, never with a
5xx of its own (the fake upstream behind it is healthy), and `/health` keeps answering
from another client throughout."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import ADMIN, gateway_config, new_key, start_gateway

MODEL_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
OTHER_PATHS = ["/v1/models", "/v1/models/tiny", "/v1/models/a/b", "/health", "/ready",
               "/metrics", "/admin/keys", "/admin/keys/ghost", "/admin/routes",
               "/admin/routes/tiny/canary", "/admin/routes/tiny/nope", "/admin/upstreams",
               "/v1", "/", "/v1/chat/completions/", "/%00", "/v1/../admin/keys",
               "/admin/keys?include_revoked=maybe"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
     "content": st.one_of(st.text(max_size=50), json_values)}), max_size=3)
model_fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["tiny", "absent", ""]), json_values),
    "messages": st.one_of(messages, json_values),
    "prompt": st.one_of(st.text(max_size=50), st.lists(st.integers(0, 5000), max_size=5),
                        json_values),
    "input": st.one_of(st.text(max_size=50), st.lists(st.text(max_size=10), max_size=3),
                       json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                json_values),
    "max_tokens": st.one_of(st.integers(-5, 10**9), json_values),
    "n": st.one_of(st.integers(-1, 5), json_values),
    "temperature": st.one_of(st.floats(allow_nan=False), json_values),
    "seed": json_values, "user": json_values, "tools": json_values,
    "response_format": json_values, "dimensions": json_values, "weight": json_values,
    "name": st.text(max_size=70), "rpm": json_values})


def deep(depth: int) -> bytes:
    return b'{"model":"tiny","messages":' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(deep, st.integers(500, 20_000)),
    st.just(b'{"model":"tiny","prompt":"\\ud800","input":"\\udfff"}'),
    st.just(b'{"model":"tiny","messages":"' + b"x" * 70_000 + b'"}'),  # over max_body_bytes
    st.just(b"\xff\xfe{}"),
)
bodies = st.one_of(model_fields.map(lambda d: json.dumps(d).encode()), raw_bodies,
                   json_values.map(lambda v: json.dumps(v).encode()))
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126),
                      max_size=30).map(str.strip)
# Model calls mostly as clients make them (POST, a valid key), so bodies reach the parser,
# the limits, the router and the upstream; everything else anyhow.
model_calls = st.tuples(st.sampled_from(["POST"] * 8 + METHODS), st.sampled_from(MODEL_PATHS),
                        st.sampled_from(["key"] * 6 + ["admin", "none", "bogus"]))
other_calls = st.tuples(st.sampled_from(METHODS), st.sampled_from(OTHER_PATHS),
                        st.sampled_from(["key", "admin", "admin", "none", "bogus"]))


@pytest.fixture(scope="module")
def target(fake_upstreams_module, tmp_path_factory):
    upstream = fake_upstreams_module("steady")
    canary = fake_upstreams_module("canary")
    workdir = tmp_path_factory.mktemp("fuzz")
    store = str(workdir / "keys.db")
    config = gateway_config(store, [], max_body_bytes=65536)
    config["models"] = [{"name": "tiny", "variants": [
        {"name": "stable", "weight": 90, "replicas": [upstream.url]},
        {"name": "canary", "weight": 10, "replicas": [canary.url]}]}]
    gateway = start_gateway(config, workdir)
    key = new_key(gateway, store, "fuzzer", can_pin_variant=True)
    yield gateway, key
    gateway.stop()
    assert "Traceback" not in gateway.log, gateway.log[-3000:]


class HealthWatch(threading.Thread):
    """Polls /health while the fuzzing runs; notes every miss."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.misses, self.num_checks = url, [], 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stopped.wait(0.05):
                try:
                    status = client.get(f"{self.url}/health").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                self.num_checks += 1
                if status != 200:
                    self.misses.append(status)


@pytest.fixture(scope="module")
def health_watch(target):
    watch = HealthWatch(target[0].url)
    watch.start()
    yield watch
    watch.stopped.set()
    watch.join(10)
    assert watch.num_checks > 0 and watch.misses == []


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=st.one_of(model_calls, model_calls, other_calls), body=bodies,
       variant=st.one_of(st.none(), st.none(), st.sampled_from(["stable", "canary", "nope"]),
                         header_text),
       cache_control=st.one_of(st.none(), st.sampled_from(["no-cache", "no-store"]),
                               header_text),
       content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/x"]))
def test_no_request_gets_a_5xx_or_hangs(target, health_watch, call, body, variant,
                                        cache_control, content_type):
    gateway, key = target
    method, path, auth = call
    if path.startswith("/admin/keys") and method == "DELETE" and auth == "admin":
        path = "/admin/keys/ghost"  # never revoke the fuzzing key itself
    headers = {"content-type": content_type}
    if auth != "none":
        headers["authorization"] = "Bearer " + {"key": key, "admin": ADMIN,
                                                "bogus": "qk-bogus"}[auth]
    if variant is not None:
        headers["x-quiver-variant"] = variant
    if cache_control is not None:
        headers["cache-control"] = cache_control
    response = httpx.request(method, f"{gateway.url}{path}", headers=headers, timeout=10,
                             content=body if method not in ("GET", "HEAD") else None)
    allowed_503 = path == "/ready"
    assert response.status_code < 500 or (allowed_503 and response.status_code == 503), (
        method, path, response.status_code, response.text[:500])
    if method != "HEAD" and response.status_code >= 400 and path != "/metrics":
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
