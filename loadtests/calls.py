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

from loadtests.sse import StreamResult, read_stream

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
class CallSpec:
    path: str                 # "/v1/chat/completions" or "/v1/completions"
    name: str                 # the Locust entry name
    body: dict[str, Any]

    @property
    def is_stream(self) -> bool:
        return bool(self.body.get("stream"))


def chat_spec(model: str, prompt: str, max_tokens: int, *, stream: bool, tag: str = "",
              temperature: float = 0.7) -> CallSpec:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": temperature,
                            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions"
    return CallSpec(path=path, name=f"{path} [{tag}]" if tag else path, body=body)


def completion_spec(model: str, prompt: str, max_tokens: int,
                    temperature: float = 0.7) -> CallSpec:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature, "stream": False}
    return CallSpec(path="/v1/completions", name="/v1/completions", body=body)


def new_session() -> requests.Session:
    return requests.Session()


def http_error(response: requests.Response) -> str:
    try:
        error = response.json().get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {response.status_code}: {message or response.text[:200] or response.reason}"


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


def body_samples(name: str, start: float, end: float,
                 response: requests.Response) -> list[Sample]:
    elapsed_ms = (end - start) * 1000
    try:
        num_tokens = int(response.json()["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return [Sample(POST, name, elapsed_ms, error="bad response body: no usage")]
    samples = [Sample(POST, name, elapsed_ms, response_length=num_tokens)]
    if num_tokens and end > start:
        samples.append(Sample(TOKENS_PER_S, name, num_tokens / (end - start), num_tokens))
    return samples


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
        start = self.clock()
        try:
            response = self.session.post(self.base_url + spec.path, json=spec.body,
                                         headers=self.headers, stream=spec.is_stream,
                                         timeout=(10.0, self.timeout_s))
        except requests.RequestException as exc:
            elapsed_ms = (self.clock() - start) * 1000
            return [Sample(POST, spec.name, elapsed_ms, error=f"connection error: {exc}")]
        with response:
            if response.status_code == 429:
                return [Sample(RATE_LIMITED, spec.name, (self.clock() - start) * 1000)]
            if response.status_code != 200:
                return [Sample(POST, spec.name, (self.clock() - start) * 1000,
                               error=http_error(response))]
            if spec.is_stream:
                result = read_stream(response.iter_lines(), self.clock)
                return stream_samples(spec.name, start, self.clock(), result)
            return body_samples(spec.name, start, self.clock(), response)

    def first_model(self) -> str:
        """The first model `/v1/models` lists: the default when none is configured."""
        response = self.session.get(self.base_url + "/v1/models", headers=self.headers,
                                    timeout=(10.0, 30.0))
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
