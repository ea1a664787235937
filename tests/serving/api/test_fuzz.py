"""Hypothesis fuzz of request bodies: any JSON value in any field never gets a 5xx, and
every response arrives within a bounded time (no hung connection)."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
SMALL_INT = st.integers(min_value=-3, max_value=40)
FIELDS = {
    "model": JSON | st.just("tiny"),
    "messages": JSON | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", 3]),
         "content": JSON | st.text(max_size=40)}), max_size=3),
    "prompt": JSON | st.text(max_size=40) | st.lists(st.integers(-5, 3000), max_size=8),
    "max_tokens": JSON | SMALL_INT,
    "max_completion_tokens": JSON | SMALL_INT,
    "temperature": JSON | st.floats(-1, 3),
    "top_p": JSON | st.floats(-0.5, 1.5),
    "n": JSON | st.integers(-1, 4),
    "stop": JSON | st.lists(st.text(max_size=5), max_size=3),
    "seed": JSON,
    "presence_penalty": JSON,
    "frequency_penalty": JSON,
    "logprobs": JSON | st.booleans() | SMALL_INT,
    "top_logprobs": JSON | SMALL_INT,
    "echo": JSON,
    "suffix": JSON,
    "user": JSON,
    "stream": st.booleans() | JSON,
    "stream_options": JSON | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "top_k": JSON | SMALL_INT,
    "min_p": JSON,
    "repetition_penalty": JSON,
    "ignore_eos": JSON,
    "min_tokens": JSON | SMALL_INT,
    "stop_token_ids": JSON,
    "response_format": JSON | st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
}
BASE = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
        "prompt": "Hi"}


@st.composite
def bodies(draw):
    body = dict(BASE)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4)):
        body[name] = draw(FIELDS[name])
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


def check(url: str, body: dict) -> None:
    # json.dumps writes NaN / Infinity as Python's json (and so the server) reads them.
    response = httpx.post(url, content=json.dumps(body), timeout=httpx.Timeout(60, connect=5),
                          headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert response.text.endswith("data: [DONE]\n\n")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_chat_bodies_never_5xx(live_server, body):
    check(f"{live_server.base_url}/chat/completions", body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_completion_bodies_never_5xx(live_server, body):
    check(f"{live_server.base_url}/completions", body)


@settings(max_examples=30, deadline=None)
@given(raw=st.binary(max_size=64))
def test_raw_bytes_never_5xx(live_server, raw):
    response = httpx.post(f"{live_server.base_url}/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
