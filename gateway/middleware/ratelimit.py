"""Per-key rate limits on model calls: requests/min and tokens/min token buckets.

Before the call: 1 request and the call's token estimate (`estimate_tokens`, set on the
context by `AccessMiddleware`) are taken atomically; a refusal is a 429 with
`Retry-After`. After it: the estimate is settled against the real usage the proxy
recorded (0 for a cache hit or a failed call). Every admitted model call of a key with
limits carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, as does its 429.
When the limiter's backend (Redis) is unreachable, `rate_limit.failure_mode` decides:
`fail_open` admits the call unchecked (no headers), `fail_closed` answers 503
`rate_limiter_unavailable`; either way `quiver_gateway_rate_limit_failures_total{mode}`
counts it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import send_api_error
from gateway.context import is_model_call, request_context, with_headers
from gateway.errors import LimiterDownError, RateLimitError
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import LimiterUnavailableError, Limits, RateLimitDecision, RateLimiter
from gateway.settings import RateLimitSettings
from gateway.spans import phase_span, set_attributes


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, settings: RateLimitSettings,
                 metrics: GatewayMetrics) -> None:
        self.app = app
        self.limiter = limiter
        self.settings = settings
        self.metrics = metrics

    def limits_for(self, rpm: int | None, tpm: int | None) -> Limits:
        return Limits(rpm=rpm or self.settings.default_rpm, tpm=tpm or self.settings.default_tpm)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope) if is_model_call(scope) else None
        key = context.key if context is not None else None
        if context is None or key is None or context.body is None:
            await self.app(scope, receive, send)
            return
        limits = self.limits_for(key.rpm, key.tpm)
        if limits.is_unlimited:
            await self.app(scope, receive, send)
            return
        reserved = context.estimated_tokens  # set by AccessMiddleware
        try:
            with phase_span("ratelimit") as span:
                decision = await self.limiter.acquire(key.name, limits, reserved)
                set_attributes(span, allowed=decision.allowed, reserved_tokens=reserved)
        except LimiterUnavailableError:
            self.metrics.rate_limit_failures.labels("fail_closed").inc()
            await send_api_error(send, LimiterDownError(
                "Rate limits cannot be checked right now (their store is unreachable), so "
                "this gateway refuses calls; retry shortly.", retry_after_s=1.0))
            return
        if not decision.allowed:
            await self.refuse(send, key.name, decision)
            return
        if decision.is_unchecked:
            self.metrics.rate_limit_failures.labels("fail_open").inc()
        headers = decision.headers()

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = with_headers(message, headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            await self.limiter.settle(key.name, limits, reserved, context.total_tokens)

    async def refuse(self, send: Send, key_name: str, decision: RateLimitDecision) -> None:
        kind = decision.refused_by or "requests"
        self.metrics.rate_limited.labels(key_name, kind).inc()
        limit = decision.limit_requests if kind == "requests" else decision.limit_tokens
        unit = "requests" if kind == "requests" else "tokens"
        error = RateLimitError(
            f"Rate limit reached for key {key_name!r} on {unit} per minute: limit {limit}. "
            f"Please try again in {decision.retry_after_s or 0:.1f}s.",
            retry_after_s=decision.retry_after_s, code="rate_limit_exceeded")
        await send_api_error(send, error, extra_headers=decision.headers())
