"""The routed model calls: POST /v1/chat/completions, /v1/completions and /v1/embeddings.

Relays to the variant `RouteMiddleware` chose (or a fallback model's, when it cannot answer)
and rewrites only what it must: the upstream's model name, and usage always requested on
streams so that limits and budgets see real tokens (the relay drops the usage chunk again
when the client did not ask for it). Hands the relay the call's affinity key (its session or
prompt prefix, `upstream.balance`) for prefix-aware balancing. Mirrors a share to a shadow
variant, and relays through the `UpstreamPool` (`gateway.relay`). A client that disconnects
cancels the upstream request. A call sampled for quality judging has its answer copied as it
goes out and, when stable itself answered (not a fallback), is replayed on the canaries
afterwards (`gateway.routing.quality`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from common.asgi import request_id_var, tracing_enabled
from common.asgi.disconnect import ClientDisconnectedError, until_disconnect
from gateway.context import request_context
from gateway.estimate import EMBEDDINGS_PATH
from gateway.metrics import GatewayMetrics
from gateway.relay import Relay, wants_usage
from gateway.routing import RouteDecision
from gateway.routing.quality import AnswerCapture, Replayer
from gateway.routing.router import Router
from gateway.upstream.balance import SESSION_HEADER, affinity_key
from gateway.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)
PASSED_HEADERS = ("traceparent", "tracestate")


def upstream_body(body: dict[str, Any], raw: bytes, decision: RouteDecision, *,
                  path: str) -> bytes:
    """The body for the variant's replicas; the client's bytes when nothing changes."""
    changes: dict[str, Any] = {}
    if decision.upstream_model != body["model"]:
        changes["model"] = decision.upstream_model
    is_stream = body.get("stream") is True and path != EMBEDDINGS_PATH
    if is_stream and not wants_usage(body):
        options = body.get("stream_options")
        changes["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
    if not changes:
        return raw
    return json.dumps({**body, **changes}, separators=(",", ":")).encode()


def forward_headers(scope: Scope) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    request_id = request_id_var.get()
    if request_id:
        headers["x-request-id"] = request_id
    if not tracing_enabled():  # else the relay's client span sends its own context
        client_headers = Headers(scope=scope)
        for name in PASSED_HEADERS:
            value = client_headers.get(name)
            if value is not None:
                headers[name] = value
    return headers


class ProxyEndpoint:
    """The ASGI endpoint behind both model routes."""

    def __init__(self, *, router: Router, pool: UpstreamPool, metrics: GatewayMetrics,
                 replayer: Replayer | None = None) -> None:
        self.router = router
        self.relay = Relay(pool=pool, router=router, metrics=metrics)
        self.replayer = replayer
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope)
        decision = context.decision
        assert decision is not None  # RouteMiddleware ran
        context.variant = decision.variant
        body = upstream_body(context.body, context.raw_body, decision, path=scope["path"])
        headers = forward_headers(scope)
        if decision.shadow_variant is not None:
            self.mirror(scope["path"], context.body, decision, headers)
        path, raw = scope["path"], context.raw_body

        def body_for(chosen: RouteDecision) -> bytes:  # the routed model's, or a fallback's
            return body if chosen is decision else upstream_body(context.body, raw, chosen,
                                                                 path=path)

        capture = None
        if self.replayer is not None and self.replayer.wants(decision, path, context.body):
            send = capture = AnswerCapture(send)
        affinity = affinity_key(context.body, path, Headers(scope=scope).get(SESSION_HEADER))
        work = self.relay.forward(send, context, decision, path=path, body_for=body_for,
                                  headers=headers, affinity=affinity)
        with contextlib.suppress(ClientDisconnectedError):  # the upstream call is cancelled
            await until_disconnect(receive, work)
        if capture is not None and context.is_complete and context.fallback_model is None:
            self.replayer.offer(decision, path, context.body, capture)

    def mirror(self, path: str, body: dict[str, Any], decision: RouteDecision,
               headers: dict[str, str]) -> None:
        """Send a copy to the shadow variant (never streamed) and discard the answer."""
        shadow_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        shadow_body["model"] = self.router.upstream_model(decision.model,
                                                          decision.shadow_variant)
        task = asyncio.create_task(self.relay.shadow(decision, path, shadow_body, headers))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def close(self) -> None:
        if self.replayer is not None:
            await self.replayer.close()
        for task in list(self._shadow_tasks):
            task.cancel()
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

