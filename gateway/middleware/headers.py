"""Puts the gateway's verdicts on every response: `x-quiver-cache` (hit|miss|bypass, from
the cache layer), `x-quiver-variant` (which variant served, once the router chose) and
`x-quiver-fallback` (the fallback model that answered, when the routed one could not)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import request_context, with_headers

CACHE_HEADER = b"x-quiver-cache"
VARIANT_HEADER = b"x-quiver-variant"
FALLBACK_HEADER = b"x-quiver-fallback"


class ResponseHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = request_context(scope)

        async def send_with_verdicts(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(CACHE_HEADER, context.cache_status.encode())]
                if context.variant:
                    extra.append((VARIANT_HEADER, context.variant.encode()))
                if context.fallback_model:
                    extra.append((FALLBACK_HEADER, context.fallback_model.encode()))
                message = with_headers(message, extra)
            await send(message)

        await self.app(scope, receive, send_with_verdicts)
