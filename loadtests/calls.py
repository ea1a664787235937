"""One OpenAI call, timed and turned into the samples Locust records. No Locust import here.

Entries (Locust's request_type / name):
- `POST <path> [tag]`: the whole request, end to end; a failure on an HTTP error (not 429),
  an error event inside a stream, a truncated stream, a connection error or a bad body.
- `TTFT`: time to the first generated token (streams only), in ms.
- `ITL`: each gap between two generated tokens (streams only), in ms.
- `TOKENS/s`: output tokens per second of one request (tokens / end-to-end time); Locust's
  "response time" column holds the rate, its content size the number of tokens.
- `429`: a rate-limited call, kept out of the endpoint's entry and never a failure, but visible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from loadtests.sse import StreamResult, Usage, read_stream

TTFT = "TTFT"
ITL = "ITL"
TOKENS_PER_S = "TOKENS/s"
RATE_LIMITED = "429"
POST = "POST"


@dataclass(frozen=True)
class Sample:
    """One Locust request event."""

    request_type: str
    name: str
    response_time_ms: float
    response_length: int = 0
    error: str | None = None


@dataclass(frozen=True)
class CallOutcome:
    """What one call gave: its Locust samples (the first is the call itself: `POST` or
    `429`), the generated text and the usage the server reported (None when it sent none)."""

    samples: list[Sample]
    text: str = ""
    usage: Usage | None = None

    @property
    def call(self) -> Sample:
        return self.samples[0]

    @property
    def ttft_ms(self) -> float | None:
        return next((s.response_time_ms for s in self.samples if s.request_type == TTFT), None)

    @property
    def is_ok(self) -> bool:
        return self.call.request_type == POST and self.call.error is None


@dataclass(frozen=True)
class CallSpec:
    path: str                 # "/v1/chat/completions" or "/v1/completions"
    name: str                 # the Locust entry name
    body: dict[str, Any]

    @property
    def is_stream(self) -> bool:
        return bool(self.body.get("stream"))


def chat_spec(model: str, prompt: str, max_tokens: int, *, stream: bool, tag: str = "",
              temperature: float = 0.7) -> CallSpec:
    return messages_spec(model, [{"role": "user", "content": prompt}], max_tokens,
                         stream=stream, tag=tag, temperature=temperature)


def messages_spec(model: str, messages: list[dict[str, str]], max_tokens: int, *,
                  stream: bool, tag: str = "", temperature: float = 0.7) -> CallSpec:
    """A chat call with the whole message list (a conversation resends its history)."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": temperature, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions"
    return CallSpec(path=path, name=f"{path} [{tag}]" if tag else path, body=body)


def completion_spec(model: str, prompt: str, max_tokens: int,
                    temperature: float = 0.7) -> CallSpec:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature, "stream": False}
    return CallSpec(path="/v1/completions", name="/v1/completions", body=body)


def new_session(pool_size: int = 10) -> requests.Session:
    """A session keeping up to `pool_size` connections per host (open loop: its in-flight cap)."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def http_error(response: requests.Response) -> str:
    try:
        error = response.json().get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {response.status_code}: {message or response.text[:200] or response.reason}"


def stream_outcome(name: str, start: float, end: float, result: StreamResult) -> CallOutcome:
    samples = stream_samples(name, start, end, result)
    if samples[0].error is not None:
        return CallOutcome(samples)
    return CallOutcome(samples, result.text, result.usage)


def stream_samples(name: str, start: float, end: float, result: StreamResult) -> list[Sample]:
    elapsed_ms = (end - start) * 1000
    if result.failure is not None:
        return [Sample(POST, name, elapsed_ms, error=result.failure)]
    num_tokens = result.num_output_tokens
    samples = [Sample(POST, name, elapsed_ms, response_length=num_tokens)]
    times = result.token_times
    if times:
        samples.append(Sample(TTFT, name, (times[0] - start) * 1000))
        gaps = zip(times, times[1:], strict=False)
        samples += [Sample(ITL, name, (later - earlier) * 1000) for earlier, later in gaps]
    if num_tokens and end > start:
        samples.append(Sample(TOKENS_PER_S, name, num_tokens / (end - start), num_tokens))
    return samples


def body_text(body: dict) -> str:
    """The first choice's text: chat `message.content` or completions `text`."""
    choice = (body.get("choices") or [{}])[0]
    if not isinstance(choice, dict):
        return ""
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else choice.get("text")
    return content if isinstance(content, str) else ""


def body_outcome(name: str, start: float, end: float,
                 response: requests.Response) -> CallOutcome:
    elapsed_ms = (end - start) * 1000
    try:
        body = response.json()
        usage = Usage.parse(body.get("usage"))
    except (ValueError, AttributeError):
        usage = None
    if usage is None:
        return CallOutcome([Sample(POST, name, elapsed_ms, error="bad response body: no usage")])
    num_tokens = usage.completion_tokens
    samples = [Sample(POST, name, elapsed_ms, response_length=num_tokens)]
    if num_tokens and end > start:
        samples.append(Sample(TOKENS_PER_S, name, num_tokens / (end - start), num_tokens))
    return CallOutcome(samples, body_text(body), usage)


class OpenAICaller:
    """Makes calls on one `requests.Session` (gevent-patched under Locust)."""

    def __init__(self, session: requests.Session, base_url: str, api_key: str | None,
                 timeout_s: float = 120.0, clock: Callable[[], float] = time.perf_counter):
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.clock = clock

    def call(self, spec: CallSpec) -> list[Sample]:
        return self.exchange(spec).samples

    def exchange(self, spec: CallSpec) -> CallOutcome:
        start = self.clock()
        try:
            response = self.session.post(self.base_url + spec.path, json=spec.body,
                                         headers=self.headers, stream=spec.is_stream,
                                         timeout=(10.0, self.timeout_s))
        except requests.RequestException as exc:
            elapsed_ms = (self.clock() - start) * 1000
            return CallOutcome([Sample(POST, spec.name, elapsed_ms,
                                       error=f"connection error: {exc}")])
        with response:
            if response.status_code == 429:
                return CallOutcome([Sample(RATE_LIMITED, spec.name,
                                           (self.clock() - start) * 1000)])
            if response.status_code != 200:
                return CallOutcome([Sample(POST, spec.name, (self.clock() - start) * 1000,
                                           error=http_error(response))])
            if spec.is_stream:
                result = read_stream(response.iter_lines(), self.clock)
                return stream_outcome(spec.name, start, self.clock(), result)
            return body_outcome(spec.name, start, self.clock(), response)

    def first_model(self) -> str:
        """The first model `/v1/models` lists: the default when none is configured."""
        response = self.session.get(self.base_url + "/v1/models", headers=self.headers,
                                    timeout=(10.0, 30.0))
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
