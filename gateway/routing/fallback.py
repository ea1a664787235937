"""Fallback models: which model answers a call when the routed one cannot.

A model's `fallbacks` are tried in order, each only when the model before it could not
answer, for one of four reasons:

- `unavailable`: no healthy replica, or none could be connected to (the pool's 503);
- `error`: a 5xx answer, or one the gateway could not read (502);
- `timeout`: no answer within the time limits (504);
- `context_length`: the prompt is over the model's context (the upstream's 400 with code
  `context_length_exceeded`, or vLLM's "maximum context length" message).

Any other answer (200, the client's own 4xx) is final. Only the listed models are tried,
not their own fallbacks, and only those the caller's key may use. Nothing has reached the
client when the next one is tried (a stream falls back only before its response starts).
"""

from __future__ import annotations

import json
from typing import Literal

from gateway.errors import GatewayError, NoUpstreamError, UpstreamError, UpstreamTimeoutError

FallbackReason = Literal["unavailable", "error", "timeout", "context_length"]
FALLBACK_REASONS: tuple[FallbackReason, ...] = ("unavailable", "error", "timeout",
                                               "context_length")
CONTEXT_LENGTH_CODE = "context_length_exceeded"
CONTEXT_LENGTH_PHRASES = ("maximum context length", "maximum model length",
                          "longer than the maximum")


def reason_for_error(error: GatewayError) -> FallbackReason | None:
    """Why the gateway's own error (the pool gave up) lets a fallback try; None: final."""
    if isinstance(error, UpstreamTimeoutError):
        return "timeout"
    if isinstance(error, NoUpstreamError):
        return "unavailable"
    if isinstance(error, UpstreamError):
        return "error"
    return None


def reason_for_answer(status: int, body: bytes) -> FallbackReason | None:
    """Why an upstream's non-200 answer lets a fallback try; None: relay it as it is."""
    if status >= 500:
        return "error"
    if status == 400 and is_context_length_error(body):
        return "context_length"
    return None


def is_context_length_error(body: bytes) -> bool:
    """An upstream's 400 says the prompt (plus max_tokens) does not fit its context:
    OpenAI's shape with our code, or vLLM's message, nested or flat."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict):
        return False
    error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    if error.get("code") == CONTEXT_LENGTH_CODE:
        return True
    message = error.get("message")
    return isinstance(message, str) and any(phrase in message.lower()
                                            for phrase in CONTEXT_LENGTH_PHRASES)
