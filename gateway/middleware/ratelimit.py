"""Per-key rate limits on model calls: requests/min and tokens/min token buckets.

Before the call: 1 request and an estimate of its tokens (prompt characters / 4, plus
`max_tokens` (or `max_completion_tokens`, else the configured default) times `n`) are
taken atomically; a refusal is a 429 with `Retry-After`. After it: the estimate is settled
against the real usage the proxy recorded (0 for a cache hit or a failed call). Every
response to a limited key carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.context import Scope, is_model_call, request_context, with_headers
from gateway.errors import RateLimitError
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import Limits, RateLimitDecision, RateLimiter
from gateway.settings import RateLimitSettings
from serving.protocol.errors import send_api_error

CHARS_PER_TOKEN = 4


def estimate_tokens(body: dict[str, Any], default_max_tokens: int) -> int:
    """Prompt + completion tokens this request may use, before any tokenizer has seen it."""
    prompt = body.get("messages", body.get("prompt", ""))
    prompt_chars = len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        max_tokens = default_max_tokens
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
    return prompt_chars // CHARS_PER_TOKEN + 1 + max_tokens * n


class RateLimitMiddleware:
    def __init__(self, app: Any, *, limiter: RateLimiter, settings: RateLimitSettings,
                 metrics: GatewayMetrics) -> None:
        self.app = app
        self.limiter = limiter
        self.settings = settings
        self.metrics = metrics

    def limits_for(self, rpm: int | None, tpm: int | None) -> Limits:
        return Limits(rpm=rpm or self.settings.default_rpm, tpm=tpm or self.settings.default_tpm)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        context = request_context(scope) if is_model_call(scope) else None
        key = context.key if context is not None else None
        if context is None or key is None or context.body is None:
            await self.app(scope, receive, send)
            return
        limits = self.limits_for(key.rpm, key.tpm)
        if limits.is_unlimited:
            await self.app(scope, receive, send)
            return
        reserved = estimate_tokens(context.body, self.settings.default_max_tokens)
        decision = await self.limiter.acquire(key.name, limits, reserved)
        if not decision.allowed:
            await self.refuse(send, key.name, decision)
            return
        headers = decision.headers()

        async def send_with_limits(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = with_headers(message, headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            await self.limiter.settle(key.name, limits, reserved, context.total_tokens)

    async def refuse(self, send: Any, key_name: str, decision: RateLimitDecision) -> None:
        kind = decision.refused_by or "requests"
        self.metrics.rate_limited.labels(key_name, kind).inc()
        limit = decision.limit_requests if kind == "requests" else decision.limit_tokens
        unit = "requests" if kind == "requests" else "tokens"
        error = RateLimitError(
            f"Rate limit reached for key {key_name!r} on {unit} per minute: limit {limit}. "
            f"Please try again in {decision.retry_after_s or 0:.1f}s.",
            retry_after_s=decision.retry_after_s, code="rate_limit_exceeded")
        await send_api_error(send, error, extra_headers=decision.headers())
