"""Which variant serves a model call, decided before the response cache looks.

`Router.choose`: sticky per API key (or the request's `user`), or pinned by
`x-quiver-variant` for keys allowed to (`AccessMiddleware` checked that). The decision goes
into the request context: the cache keys its entries by the variant (a canary's answers
are never served as stable's, nor stable's to a caller routed to the canary), and the
proxy relays to it. An unknown model or variant is answered here (404 / 400).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import send_api_error
from gateway.context import RequestContext, is_model_call, request_context
from gateway.errors import GatewayError
from gateway.routing import RouteDecision
from gateway.routing.router import Router
from gateway.spans import phase_span, set_attributes


def choose(router: Router, context: RequestContext) -> RouteDecision:
    assert context.key is not None and context.body is not None  # auth and body ran
    return router.choose(context.body["model"], context.sticky_key, context.pinned_variant)


class RouteMiddleware:
    def __init__(self, app: ASGIApp, *, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope) if is_model_call(scope) else None
        if context is None or context.key is None or context.body is None:
            await self.app(scope, receive, send)
            return
        try:
            with phase_span("route") as span:
                context.decision = choose(self.router, context)
                set_attributes(span, variant=context.decision.variant)
        except GatewayError as error:
            await send_api_error(send, error)
            return
        await self.app(scope, receive, send)
