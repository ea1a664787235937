"""The relay's pure parts: SSE splitting, event inspection, `usage: null` stripping, and
upstream error bodies brought into OpenAI's shape."""

from __future__ import annotations

import json

import pytest

from gateway.errors import UpstreamError
from gateway.estimate import estimate_tokens
from gateway.middleware.body import parse_model_call
from gateway.relay import json_messages, upstream_error_body
from gateway.sse import (
    EventSplitter,
    carries_text,
    error_event,
    inspect_event,
    without_null_usage,
)

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE = (b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
         b'"total_tokens":5}}\n\n')


def test_splitter_yields_whole_events_whatever_the_chunking():
    stream = CHUNK + USAGE + b"data: [DONE]\n\n"
    for size in (1, 3, 7, 64, len(stream)):
        splitter, events = EventSplitter(), []
        for i in range(0, len(stream), size):
            events += splitter.feed(stream[i:i + size])
        assert events == [CHUNK, USAGE, b"data: [DONE]\n\n"]
        assert splitter.pending == b""


def test_splitter_accepts_crlf_framing():
    events = EventSplitter().feed(b"data: {}\r\n\r\ndata: [DONE]\r\n\r\n")
    assert events == [b"data: {}\n\n", b"data: [DONE]\n\n"]


def test_inspect_event_reads_usage_done_and_errors():
    assert inspect_event(b"data: [DONE]\n\n").is_done
    plain = inspect_event(CHUNK)
    assert plain.usage is None and not plain.is_usage_only and not plain.is_error
    usage = inspect_event(USAGE)
    assert usage.is_usage_only and usage.usage["completion_tokens"] == 2
    assert inspect_event(error_event("boom")).is_error
    assert json.loads(error_event("boom").removeprefix(b"data: "))["error"]["message"] == "boom"


def test_null_usage_is_stripped_and_nothing_else():
    assert without_null_usage(CHUNK) == CHUNK.replace(b',"usage":null', b"")
    assert without_null_usage(USAGE) == USAGE
    text = b'data: {"choices":[{"delta":{"content":",\\"usage\\":null"}}]}\n\n'
    assert without_null_usage(text) == text            # inside a string: escaped, untouched


def test_openai_error_bodies_pass_through_unchanged():
    body = b'{"error":{"message":"bad","type":"invalid_request_error","param":"n","code":null}}'
    assert upstream_error_body(400, body, "stable") == body


def test_vllm_flat_errors_are_nested():
    flat = json.dumps({"object": "error", "message": "too long", "type": "BadRequestError",
                       "param": None, "code": 400}).encode()
    error = json.loads(upstream_error_body(400, flat, "stable"))["error"]
    assert error == {"message": "too long", "type": "BadRequestError", "param": None,
                     "code": "400"}


def test_plain_text_4xx_is_wrapped_with_its_status_kept():
    error = json.loads(upstream_error_body(429, b"slow down", "stable"))["error"]
    assert error["message"] == "slow down" and error["type"] == "rate_limit_error"


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"", b'{"detail": 1}'])
def test_5xx_garbage_is_a_502(body):
    with pytest.raises(UpstreamError) as exc:
        upstream_error_body(503, body, "canary")
    assert exc.value.status_code == 502 and "canary" in exc.value.message


def test_upstream_retry_after_goes_along():
    start, _ = json_messages(429, b"{}", {"retry-after": "7"})
    assert (b"retry-after", b"7") in start["headers"]


@pytest.mark.parametrize(("raw", "param"), [
    (b"not json", None), (b"[1, 2]", None), (b'{"messages": []}', "model"),
    (b'{"model": 3}', "model"), (b'{"model": "m", "stream": "true"}', "stream"),
    (b'{"model": "m", "stream_options": "x"}', "stream_options"),
])
def test_model_call_bodies_the_gateway_acts_on_are_checked(raw, param):
    from gateway.errors import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        parse_model_call(raw)
    assert exc.value.param == param


def estimate(body: dict, path: str = "/v1/chat/completions", context: int | None = None) -> int:
    return estimate_tokens(body, path, default_max_tokens=256,
                           context_tokens=context).total_tokens


def test_token_estimate_covers_prompt_max_tokens_and_n():
    chat = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 10, "n": 2}
    assert estimate(chat) == len(json.dumps(chat["messages"])) // 4 + 1 + 20
    completions = "/v1/completions"
    assert estimate({"prompt": "abcd"}, completions) == 1 + 1 + 256
    assert estimate({"prompt": "abcd", "max_completion_tokens": 5}, completions) == 7


def test_token_estimate_counts_every_prompt_times_n():
    many = {"prompt": ["x" * 40] * 4, "max_tokens": 50, "n": 2}
    assert estimate(many, "/v1/completions") == 4 * 11 + 4 * 50 * 2
    ids = {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 10, "best_of": 3, "n": 1}
    assert estimate(ids, "/v1/completions") == 5 + 2 * 10 * 3


def test_without_max_tokens_the_estimate_runs_to_the_context():
    body = {"prompt": "x" * 400}
    assert estimate(body, "/v1/completions", context=2048) == 2048
    assert estimate({**body, "n": 2}, "/v1/completions", context=2048) == 101 + 2 * 1947
    assert estimate(body, "/v1/completions") == 101 + 256  # no context known


def test_tools_and_response_formats_are_prompt_tokens():
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 4000,
                                               "parameters": {"type": "object"}}}]
    assert estimate({**base, "tools": tools}) - estimate(base) >= 1000
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "description": "d" * 2000}}}
    assert estimate({**base, "response_format": schema}) - estimate(base) >= 500


def test_embeddings_estimate_is_their_input():
    assert estimate({"input": "x" * 400}, "/v1/embeddings") == 101
    assert estimate({"input": ["ab", "cd", [1, 2, 3]]}, "/v1/embeddings") == 1 + 1 + 3


@pytest.mark.parametrize("event,has_output", [
    (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n', False),
    (b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', True),
    (b'data: {"choices":[{"index":0,"text":" once"}]}\n\n', True),
    (b'data: {"choices":[{"delta":{"reasoning_content":"Let me"}}]}\n\n', True),
    (b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1"}]}}]}\n\n', True),
    (b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n', False),
    (b"data: [DONE]\n\n", False),
])
def test_first_token_is_the_first_event_with_generated_output(event, has_output):
    assert carries_text(event) is has_output
