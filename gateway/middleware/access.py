"""What a key may do with a model call, once its body is parsed; and what it used.

- The model must be one the key allows -> else 403 `model_not_allowed`.
- `x-quiver-variant` pins a variant only for keys allowed to -> else 403
  `variant_pinning_not_allowed` (checked here, before the cache could answer).
- A token budget is reserved up front: the call's estimate (`gateway.estimate`: prompt +
  `max_tokens` x `n` x prompts, or up to the model's context without `max_tokens`) must
  fit in what is left, counting calls in flight -> else 429 `insufficient_quota`.
After the response the reservation is released and the real usage is counted against the
budget and in `quiver_gateway_tokens_total{key,model,kind}` (the key's name, never the key),
once, for the model that answered (a fallback's, when one did).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import send_api_error
from gateway.context import InFlight, RequestContext, is_model_call, request_context
from gateway.errors import GatewayError, PermissionDeniedError, QuotaExceededError
from gateway.estimate import estimate_tokens
from gateway.keyring import KeyRing
from gateway.keys import ApiKey
from gateway.metrics import GatewayMetrics
from gateway.settings import RateLimitSettings

PIN_HEADER = "x-quiver-variant"


class AccessMiddleware:
    def __init__(self, app: ASGIApp, *, keyring: KeyRing, settings: RateLimitSettings,
                 metrics: GatewayMetrics, context_tokens: Callable[[str], int | None],
                 in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight
        self.keyring = keyring
        self.settings = settings
        self.metrics = metrics
        self.context_tokens = context_tokens  # a model's context length, when known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope) if is_model_call(scope) else None
        if context is None or context.key is None or context.body is None:
            await self.app(scope, receive, send)
            return
        key = context.key
        estimate = estimate_tokens(context.body, scope["path"],
                                   default_max_tokens=self.settings.default_max_tokens,
                                   context_tokens=self.context_tokens(context.body["model"]))
        context.estimated_tokens = estimate.total_tokens
        context.estimated_prompt_tokens = estimate.prompt_tokens
        try:
            self.check(key, context, Headers(scope=scope).get(PIN_HEADER))
        except GatewayError as error:
            await send_api_error(send, error)
            return
        with self.in_flight:
            try:
                await self.app(scope, receive, send)
            finally:
                self.keyring.release(key, context.estimated_tokens)
                self.account(key, context)

    def check(self, key: ApiKey, context: RequestContext, pinned: str | None) -> None:
        model = context.model
        if not key.allows_model(model):
            self.metrics.auth_failures.labels("model_not_allowed").inc()
            raise PermissionDeniedError(
                f"The API key {key.name!r} is not allowed to use the model `{model}`.",
                param="model", code="model_not_allowed")
        if pinned is not None and not key.can_pin_variant:
            self.metrics.auth_failures.labels("variant_pinning_not_allowed").inc()
            raise PermissionDeniedError(
                f"The API key {key.name!r} may not pin a variant with x-quiver-variant.",
                code="variant_pinning_not_allowed")
        context.pinned_variant = pinned
        left = self.keyring.reserve(key, context.estimated_tokens)
        if left is not None:
            self.metrics.auth_failures.labels("budget_exhausted").inc()
            raise QuotaExceededError(
                f"The API key {key.name!r} has {max(0, left)} tokens of its budget of "
                f"{key.budget_tokens} left, and this request may use up to "
                f"{context.estimated_tokens} (prompt + max_tokens x n, or up to the model's "
                "context without max_tokens). Set or lower max_tokens, or raise the budget.")

    def account(self, key: ApiKey, context: RequestContext) -> None:
        if context.total_tokens <= 0:
            return
        labels = (key.name, context.answering_model, context.variant or "")
        self.metrics.tokens.labels(*labels, "prompt").inc(context.prompt_tokens)
        self.metrics.tokens.labels(*labels, "completion").inc(context.completion_tokens)
        self.keyring.add_usage(key, context.total_tokens)
