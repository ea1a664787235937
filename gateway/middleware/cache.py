"""The response cache for model calls, between the router's choice and the relay.

Lookup unless `Cache-Control: no-cache`; store unless `no-store`; only deterministic
requests (temperature 0 or a seed; embeddings always) unless configured otherwise; only
complete 200 answers of the routed model (the proxy says so: no error, no truncated stream,
no fallback model's answer). Keys are per
tenant, so one tenant never sees another's entries, and per variant (the router chose it
before the lookup), so a canary's answers never pass for stable's or the other way round.
A hit replays the stored bytes (a JSON body or a whole SSE stream).
The verdict goes into the request context; `ResponseHeadersMiddleware` puts it on every
response as `x-quiver-cache: hit|miss|bypass`.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.cache import CachedResponse, ResponseCache, cache_key, is_deterministic
from gateway.context import (
    RequestContext,
    is_model_call,
    request_context,
)
from gateway.estimate import EMBEDDINGS_PATH
from gateway.metrics import GatewayMetrics
from gateway.settings import CacheSettings
from gateway.spans import phase_span, set_attributes

STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def cache_directives(scope: Scope) -> set[str]:
    value = Headers(scope=scope).get("cache-control") or ""
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def hit_messages(entry: CachedResponse) -> list[Message]:
    headers = [(b"content-type", entry.content_type.encode()),
               (b"content-length", str(len(entry.body)).encode())]
    if entry.is_stream:
        headers += STREAM_HEADERS
    return [{"type": "http.response.start", "status": 200, "headers": headers},
            {"type": "http.response.body", "body": entry.body}]


class CacheMiddleware:
    def __init__(self, app: ASGIApp, *, cache: ResponseCache | None, settings: CacheSettings,
                 metrics: GatewayMetrics) -> None:
        self.app = app
        self.cache = cache if settings.enabled else None
        self.settings = settings
        self.metrics = metrics

    def lookup_key(self, scope: Scope, context: RequestContext) -> str | None:
        body, key, decision = context.body, context.key, context.decision
        if self.cache is None or body is None or key is None or decision is None:
            return None
        path = scope["path"]
        deterministic = path == EMBEDDINGS_PATH or is_deterministic(body)
        if not (self.settings.cache_nondeterministic or deterministic):
            return None
        # entries are the answering variant's: a canary's answer is never stable's
        return cache_key(key.tenant, f"{path}#{decision.variant}", body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_model_call(scope):
            await self.app(scope, receive, send)
            return
        context = request_context(scope)
        key = self.lookup_key(scope, context)
        directives = cache_directives(scope)
        may_read = key is not None and "no-cache" not in directives
        may_store = key is not None and "no-store" not in directives
        if may_read:
            with phase_span("cache") as span:
                entry = await self.cache.get(key)
                set_attributes(span, cache_result="hit" if entry is not None else "miss")
            if entry is not None:
                context.cache_status = "hit"
                context.variant = entry.variant
                self.metrics.cache_requests.labels("hit").inc()
                for message in hit_messages(entry):
                    await send(message)
                return
        context.cache_status = "miss" if may_read or may_store else "bypass"
        self.metrics.cache_requests.labels(context.cache_status).inc()
        await self.forward(scope, receive, send, context, key if may_store else None)

    async def forward(self, scope: Scope, receive: Receive, send: Send, context: RequestContext,
                      store_key: str | None) -> None:
        captured: list[bytes] | None = [] if store_key is not None else None
        state = {"status": 0, "size": 0, "content_type": "application/json"}

        async def capturing_send(message: Message) -> None:
            nonlocal captured
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"content-type":
                        state["content_type"] = value.decode("latin-1")
            elif message["type"] == "http.response.body" and captured is not None:
                state["size"] += len(message.get("body", b""))
                if state["size"] > self.settings.max_entry_bytes:
                    captured = None
                else:
                    captured.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capturing_send)
        # a fallback's answer is never stored as the routed variant's
        if (captured is not None and state["status"] == 200 and context.is_complete
                and context.fallback_model is None):
            await self.cache.put(store_key, CachedResponse(
                body=b"".join(captured), content_type=str(state["content_type"]),
                variant=context.variant or "", prompt_tokens=context.prompt_tokens,
                completion_tokens=context.completion_tokens))
