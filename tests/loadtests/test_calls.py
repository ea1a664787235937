"""Calls and streams into Locust samples: error events, truncated streams and HTTP errors are
failures of the endpoint; 429s go to their own entry; good streams give TTFT, ITL, TOKENS/s.

The parser is driven directly, and the caller against a tiny HTTP server in the test (no Locust
import here: it would gevent-patch the whole pytest process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from loadtests.calls import (
    ITL,
    POST,
    RATE_LIMITED,
    TOKENS_PER_S,
    TTFT,
    OpenAICaller,
    chat_spec,
    completion_spec,
)
from loadtests.sse import Usage, read_stream


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3}})
ROLE = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})


def ticking_clock(step: float = 0.01):
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    return clock


def test_a_complete_stream_records_each_token_and_usage():
    lines = [ROLE, "", chunk("a"), "", ": keep-alive", chunk("b"), chunk("c"), USAGE,
             "data: [DONE]", chunk("after done is ignored")]
    result = read_stream([line.encode() for line in lines], ticking_clock())
    assert result.failure is None
    assert len(result.token_times) == 3   # the role-only chunk is no token
    assert result.num_output_tokens == 3


def test_an_error_event_in_the_stream_is_a_failure_with_its_message():
    error = json.dumps({"error": {"message": "engine overloaded", "type": "server_error"}})
    result = read_stream([chunk("a"), f"data: {error}", "data: [DONE]"])
    assert result.failure == "error event in stream: engine overloaded"


def test_a_stream_without_done_is_truncated():
    result = read_stream([chunk("a"), chunk("b")])
    assert result.failure == "stream truncated: no [DONE] after 2 tokens"


def test_a_broken_connection_mid_stream_is_truncated():
    def lines() -> Iterator[bytes]:
        yield chunk("a").encode()
        raise requests.exceptions.ChunkedEncodingError("connection reset")

    result = read_stream(lines())
    assert result.failure.startswith("stream truncated: connection broke after 1 tokens")


def test_a_malformed_event_is_a_failure():
    assert read_stream(["data: {not json", "data: [DONE]"]).failure.startswith(
        "malformed stream event")


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers by the prompt: `ok`, `error-event`, `truncated`, `http-500`, `rate-limited`."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body.get("prompt") or body["messages"][0]["content"]
        if prompt in ("http-500", "rate-limited"):
            code = 500 if prompt == "http-500" else 429
            self.reply(code, {"error": {"message": f"said {code}", "type": "x", "code": None}})
        elif body.get("stream"):
            self.stream(prompt)
        else:
            self.reply(200, {"choices": [{"text": "abc"}], "usage": {"completion_tokens": 3}})

    def reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream(self, prompt: str) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        events = [chunk("a"), chunk("b"), chunk("c")]
        if prompt == "error-event":
            events.append("data: " + json.dumps({"error": {"message": "boom"}}))
        if prompt == "ok":
            events += [USAGE, "data: [DONE]"]
        self.wfile.write("".join(f"{event}\n\n" for event in events).encode())
        self.close_connection = True


@pytest.fixture(scope="module")
def caller() -> Iterator[OpenAICaller]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    session = requests.Session()
    try:
        yield OpenAICaller(session, f"http://127.0.0.1:{server.server_port}", "qk-test")
    finally:
        session.close()
        server.shutdown()
        server.server_close()


def stream_call(caller: OpenAICaller, prompt: str):
    return caller.call(chat_spec("m", prompt, 8, stream=True, tag="stream"))


def test_a_good_stream_gives_the_call_ttft_itl_and_tokens_per_s(caller):
    samples = stream_call(caller, "ok")
    kinds = [s.request_type for s in samples]
    assert kinds == [POST, TTFT, ITL, ITL, TOKENS_PER_S]
    assert all(s.error is None for s in samples)
    assert {s.name for s in samples} == {"/v1/chat/completions [stream]"}
    call, ttft = samples[0], samples[1]
    assert 0 <= ttft.response_time_ms <= call.response_time_ms
    assert samples[-1].response_length == 3 and samples[-1].response_time_ms > 0


@pytest.mark.parametrize("prompt, error", [
    ("error-event", "error event in stream: boom"),
    ("truncated", "stream truncated: no [DONE] after 3 tokens"),
    ("http-500", "HTTP 500: said 500"),
])
def test_failures_are_one_failed_call_and_nothing_else(caller, prompt, error):
    samples = stream_call(caller, prompt)
    assert [(s.request_type, s.error) for s in samples] == [(POST, error)]


def test_a_429_is_its_own_entry_and_no_failure(caller):
    samples = stream_call(caller, "rate-limited")
    assert [(s.request_type, s.name, s.error) for s in samples] == [
        (RATE_LIMITED, "/v1/chat/completions [stream]", None)]


def test_a_non_streamed_call_counts_its_usage_tokens(caller):
    samples = caller.call(completion_spec("m", "ok", 8))
    assert [(s.request_type, s.response_length, s.error) for s in samples] == [
        (POST, 3, None), (TOKENS_PER_S, 3, None)]


def test_a_refused_connection_is_a_failed_call():
    session = requests.Session()
    with session:
        samples = OpenAICaller(session, "http://127.0.0.1:9", None).call(
            completion_spec("m", "ok", 8))
    assert len(samples) == 1 and samples[0].request_type == POST
    assert samples[0].error.startswith("connection error:")


def test_a_stream_keeps_its_text_and_the_usage_with_cached_tokens():
    usage = {"prompt_tokens": 640, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 608}}
    lines = [ROLE, chunk("Hel"), chunk("lo"), "data: " + json.dumps({"choices": [],
                                                                      "usage": usage}),
             "data: [DONE]"]
    result = read_stream(lines)
    assert result.text == "Hello"
    assert result.usage == Usage(prompt_tokens=640, completion_tokens=2, cached_tokens=608)


@pytest.mark.parametrize("usage, parsed", [
    ({"prompt_tokens": 5, "completion_tokens": 1}, Usage(5, 1, None)),   # no details
    ({"prompt_tokens": 5, "completion_tokens": "many"}, None),
    ({"prompt_tokens": 5}, None),
    ("usage", None),
])
def test_usage_without_details_or_with_garbage(usage, parsed):
    assert Usage.parse(usage) == parsed


def test_an_exchange_returns_the_answer_text_and_usage(caller):
    streamed = caller.exchange(chat_spec("m", "ok", 8, stream=True))
    assert (streamed.text, streamed.usage, streamed.is_ok) == ("abc", Usage(0, 3, None), True)
    assert streamed.ttft_ms is not None and streamed.ttft_ms <= streamed.call.response_time_ms
    plain = caller.exchange(completion_spec("m", "ok", 8))
    assert (plain.text, plain.usage.completion_tokens, plain.ttft_ms) == ("abc", 3, None)
    failed = caller.exchange(chat_spec("m", "http-500", 8, stream=True))
    assert not failed.is_ok and failed.text == "" and failed.usage is None
