"""Reading an OpenAI server-sent-event stream into what a load test records.

A stream succeeds only when it ends with `data: [DONE]` and carries no error event: an
`{"error": ...}` event inside the stream, a malformed event, or a stream that stops early
(the connection closes or breaks before `[DONE]`) is a failure, whatever the HTTP status was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    """A response's `usage`; `cached_tokens` from `prompt_tokens_details`, None when absent."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None

    @classmethod
    def parse(cls, usage: object) -> Usage | None:
        if not isinstance(usage, dict) or usage.get("completion_tokens") is None:
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        try:
            return cls(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage["completion_tokens"]),
                       cached_tokens=None if cached is None else int(cached))
        except (TypeError, ValueError):
            return None   # not numbers: treated as no usage


@dataclass
class StreamResult:
    token_times: list[float] = field(default_factory=list)  # clock() at each content chunk
    chunks: list[str] = field(default_factory=list)          # the generated text, in pieces
    usage: Usage | None = None           # the usage event, when the server sent one
    error: str | None = None             # the error event's message, or why parsing stopped
    is_done: bool = False                # `data: [DONE]` was seen

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def usage_tokens(self) -> int | None:
        return None if self.usage is None else self.usage.completion_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def failure(self) -> str | None:
        """Why this stream counts as a failure, or None when it is a success."""
        if self.error is not None:
            return self.error
        if not self.is_done:
            return f"stream truncated: no [DONE] after {len(self.token_times)} tokens"
        return None


def error_message(event: dict) -> str:
    error = event.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)


def chunk_text(event: dict) -> str:
    """The generated text in one chunk: chat `delta.content` or completions `text`."""
    text = []
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        text.append(delta.get("content") or choice.get("text") or "")
    return "".join(text)


def apply_event(result: StreamResult, payload: str, clock: Callable[[], float]) -> None:
    if payload == "[DONE]":
        result.is_done = True
        return
    try:
        event = json.loads(payload)
    except ValueError:
        result.error = f"malformed stream event: {payload[:80]!r}"
        return
    if not isinstance(event, dict):
        result.error = f"malformed stream event: {payload[:80]!r}"
    elif "error" in event:
        result.error = f"error event in stream: {error_message(event)}"
    else:
        if text := chunk_text(event):
            result.token_times.append(clock())
            result.chunks.append(text)
        if (usage := Usage.parse(event.get("usage"))) is not None:
            result.usage = usage


def read_stream(lines: Iterable[bytes | str],
                clock: Callable[[], float] = time.perf_counter) -> StreamResult:
    """Consume SSE lines until `[DONE]`, an error event, or the end of the stream.

    A broken connection while reading (any `OSError`, which `requests` errors are) ends the
    stream as truncated, with the cause in the error message.
    """
    result = StreamResult()
    try:
        for raw in lines:
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            line = line.strip()
            if not line.startswith("data:"):
                continue  # blank separators, `: keep-alive` comments, `event:` / `id:` fields
            apply_event(result, line[len("data:"):].strip(), clock)
            if result.is_done or result.error is not None:
                break
    except OSError as exc:
        result.error = (f"stream truncated: connection broke after {len(result.token_times)} "
                        f"tokens ({type(exc).__name__})")
    return result
