"""Server-sent events as the gateway relays them: split upstream bytes into whole events
(never holding back a complete one), and read the few facts it needs from each."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


class EventSplitter:
    """Feeds raw chunks in, gets complete events (each ending in a blank line) out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self._buffer = events.pop()
        return [event + b"\n\n" for event in events if event.strip()]

    @property
    def pending(self) -> bytes:
        return self._buffer


@dataclass(frozen=True)
class EventInfo:
    is_done: bool = False
    is_error: bool = False
    is_client_error: bool = False       # an error event blaming the request (4xx-like)
    is_usage_only: bool = False         # `choices: []` and a usage object
    usage: dict[str, Any] | None = None


USAGE_OBJECT = (b'"usage":{', b'"usage": {')
# Generated output in an event: a chat delta's content or reasoning, a completion choice's
# text (each non-empty), or a tool call.
TEXT_FIELD = re.compile(rb'"(?:content|text|reasoning_content)":\s?"[^"]|"tool_calls":\s?\[\s?\{')
NULL_USAGE = (b',"usage":null', b', "usage": null')


def inspect_event(event: bytes) -> EventInfo:
    """Cheap byte checks first; JSON is parsed only for usage and error events."""
    data = event.removeprefix(b"data:").strip()
    if data == b"[DONE]":
        return EventInfo(is_done=True)
    if not data.startswith(b'{"error"') and not any(m in data for m in USAGE_OBJECT):
        return EventInfo()
    try:
        payload = json.loads(data)
    except ValueError:
        return EventInfo()
    if not isinstance(payload, dict):
        return EventInfo()
    if "error" in payload:
        return EventInfo(is_error=True, is_client_error=blames_request(payload["error"]))
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return EventInfo()
    return EventInfo(usage=usage, is_usage_only=payload.get("choices") == [])


CLIENT_ERROR_TYPES = frozenset({"invalid_request_error", "BadRequestError", "NotFoundError"})


def blames_request(error: Any) -> bool:
    """An error object (OpenAI's, or vLLM's with a numeric code) about the request itself:
    type `invalid_request_error`, or an HTTP code from 400 to 499."""
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    is_4xx = isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500
    return is_4xx or error.get("type") in CLIENT_ERROR_TYPES


def carries_text(event: bytes) -> bool:
    """True when the event delivers generated text (not a role-only or usage chunk)."""
    return TEXT_FIELD.search(event) is not None


def count_output(event: bytes) -> int:
    """Generated-output fields in the event: one per choice that got text, reasoning or a
    tool-call delta. Quiver's engine and vLLM stream one token per such delta, so over a
    stream this counts the completion tokens delivered (a lower bound if a server ever
    packs several tokens into one delta)."""
    return len(TEXT_FIELD.findall(event))


def without_null_usage(event: bytes) -> bytes:
    """The event minus `"usage": null`, which chunks carry only when usage was asked for."""
    for marker in NULL_USAGE:
        if marker in event:
            return event.replace(marker, b"")
    return event


def error_event(message: str, *, code: str = "upstream_stream_error") -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None,
                      "code": code}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
