"""API-key authentication, model permissions and token budgets for `/v1/*`.

`Authorization: Bearer <key>`: a missing, unknown or revoked key -> 401; a model the key
may not use -> 403; a spent token budget -> 429 `insufficient_quota`. All in OpenAI's error
shape, naming the key only by its name. After the response, the tokens the request used
are added to the key's budget. `/health`, `/ready`, `/metrics` and `/admin` (which has its
own admin key) are not behind this middleware's keys.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from gateway.context import RequestContext, Scope, header, request_context
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    PermissionDeniedError,
    QuotaExceededError,
)
from gateway.keyring import KeyRing
from gateway.keys import ApiKey
from gateway.metrics import GatewayMetrics
from serving.protocol.errors import send_api_error

PROTECTED_PREFIX = "/v1/"


def bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class AuthMiddleware:
    def __init__(self, app: Any, *, keyring: KeyRing, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keyring = keyring
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        context = request_context(scope)
        try:
            key = self.authenticate(scope, context.model)
        except GatewayError as error:
            await send_api_error(send, error)
            return
        context.key = key
        trace.get_current_span().set_attribute("quiver.key_name", key.name)
        try:
            await self.app(scope, receive, send)
        finally:
            self.account(key, context)

    def account(self, key: ApiKey, context: RequestContext) -> None:
        """Tokens the call used: against the key's budget, and per key in the metrics."""
        if context.total_tokens <= 0 or context.model is None:
            return
        self.metrics.tokens.labels(key.name, context.model, "prompt").inc(context.prompt_tokens)
        self.metrics.tokens.labels(key.name, context.model, "completion").inc(
            context.completion_tokens)
        self.keyring.add_usage(key, context.total_tokens)

    def authenticate(self, scope: Scope, model: str | None) -> ApiKey:
        token = bearer_token(scope)
        if token is None:
            self.metrics.auth_failures.labels("missing").inc()
            raise AuthenticationError(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="missing_api_key")
        key = self.keyring.lookup(token)
        if key is None:
            self.metrics.auth_failures.labels("invalid").inc()
            raise AuthenticationError("Incorrect API key provided (unknown or revoked).")
        if model is not None and not key.allows_model(model):
            self.metrics.auth_failures.labels("model_not_allowed").inc()
            raise PermissionDeniedError(
                f"The API key {key.name!r} is not allowed to use the model `{model}`.",
                param="model", code="model_not_allowed")
        budget_left = self.keyring.budget_left(key)
        if model is not None and budget_left is not None and budget_left <= 0:
            self.metrics.auth_failures.labels("budget_exhausted").inc()
            raise QuotaExceededError(
                f"The API key {key.name!r} has used its token budget of "
                f"{key.budget_tokens} tokens.")
        return key
