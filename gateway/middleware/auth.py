"""Who is calling: API-key authentication for `/v1/*`.

`Authorization: Bearer <key>`: a missing, unknown or revoked key -> 401 in OpenAI's error
shape, before the body is read. What the key may do (models, variant pinning, budget) is
`AccessMiddleware`'s, once the body is parsed. `/health`, `/ready`, `/metrics` and `/admin`
(which has its own admin key) are not behind this middleware.
"""

from __future__ import annotations

from opentelemetry import trace
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import send_api_error
from gateway.context import request_context
from gateway.errors import AuthenticationError
from gateway.keyring import KeyRing
from gateway.keys import ApiKey
from gateway.metrics import GatewayMetrics
from gateway.spans import phase_span, set_attributes

PROTECTED_PREFIX = "/v1/"


def bearer_token(scope: Scope) -> str | None:
    value = Headers(scope=scope).get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keyring: KeyRing, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keyring = keyring
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            with phase_span("auth") as span:
                key = self.authenticate(scope)
                set_attributes(span, key_name=key.name)
        except AuthenticationError as error:
            await send_api_error(send, error)
            return
        request_context(scope).key = key
        trace.get_current_span().set_attribute("quiver.key_name", key.name)
        await self.app(scope, receive, send)

    def authenticate(self, scope: Scope) -> ApiKey:
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
        return key
