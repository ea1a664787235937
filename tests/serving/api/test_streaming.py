"""SSE streams as OpenAI sends them, and aborts on client disconnect (KV blocks freed)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.serving.api.conftest import fake_server

HELLO = [{"role": "user", "content": "Tell me a story."}]


def sse_payloads(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        text = response.read().decode()
    frames = text.split("\n\n")
    assert frames[-1] == "" and all(f.startswith("data: ") for f in frames[:-1])
    return [f.removeprefix("data: ") for f in frames[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks(live_server, include_usage):
    body = {"model": live_server.model, "messages": HELLO, "temperature": 0, "max_tokens": 10,
            "n": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": include_usage}}
    payloads = sse_payloads(f"{live_server.base_url}/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 20
        assert last["usage"]["total_tokens"] == (last["usage"]["prompt_tokens"] + 20)
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in m["delta"] for m in mine[1:])
        assert [m["finish_reason"] for m in mine][:-1] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
    non_stream = httpx.post(f"{live_server.base_url}/chat/completions",
                            json={**body, "stream": False}, timeout=60).json()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c["choices"][0]["index"] == 0)
    assert text == non_stream["choices"][0]["message"]["content"]


def test_completion_stream_with_usage(live_server):
    body = {"model": live_server.model, "prompt": "Hello", "temperature": 0, "max_tokens": 6,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    payloads = sse_payloads(f"{live_server.base_url}/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    non_stream = httpx.post(f"{live_server.base_url}/completions",
                            json={**body, "stream": False}, timeout=60).json()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == \
        non_stream["choices"][0]["text"]
    assert non_stream["usage"] == {**usage_chunk["usage"]}


def test_sdk_stream_include_usage(live_server):
    with openai.OpenAI(base_url=live_server.base_url, api_key="unused",
                       max_retries=0) as client:
        chunks = list(client.chat.completions.create(
            model=live_server.model, messages=HELLO, max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])


def engine_gauges(live_server) -> tuple[float, float]:
    return (live_server.metric("vllm:num_requests_running"),
            live_server.metric("vllm:kv_cache_usage_perc"))


def test_disconnect_mid_stream_frees_every_kv_block(live_server):
    live_server.wait_idle()
    body = {"model": live_server.model, "messages": HELLO, "max_tokens": 1900,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live_server.base_url}/chat/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        running, usage = engine_gauges(live_server)
        assert running == 1 and usage > 0
    live_server.wait_idle(timeout=10)
    assert engine_gauges(live_server) == (0.0, 0.0)


def test_disconnect_while_waiting_for_a_full_response_aborts(live_server):
    live_server.wait_idle()
    before = live_server.metric("vllm:request_success_total", finished_reason="abort")
    body = {"model": live_server.model, "prompt": "Tell me everything", "max_tokens": 1900,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.base_url}/completions", json=body, timeout=0.5)
    live_server.wait_idle(timeout=10)
    assert engine_gauges(live_server) == (0.0, 0.0)
    after = live_server.metric("vllm:request_success_total", finished_reason="abort")
    assert after == before + 1


def test_error_after_streaming_began_is_an_sse_error_event(tiny_model_dir, tiny_tokenizer):
    with fake_server("dies_mid_stream", tiny_model_dir, tiny_tokenizer) as url:
        body = {"model": "tiny", "messages": HELLO, "stream": True}
        payloads = sse_payloads(f"{url}/v1/chat/completions", body)
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "engine_dead"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client, \
                pytest.raises(openai.APIError, match=re.compile("engine loop died")):
            for _ in client.chat.completions.create(model="tiny", messages=HELLO, stream=True):
                pass
