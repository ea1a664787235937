"""Tracing: one OpenTelemetry SERVER span per request, child of the `traceparent` context.
API only: nothing is created while no SDK tracer provider is installed (`common.telemetry`
installs one when the `OTEL_*` environment asks for it)."""

from __future__ import annotations

from opentelemetry import propagate, trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.asgi.metrics import route_label
from common.asgi.request_id import request_id_var


def tracing_enabled() -> bool:
    """True once an SDK tracer provider is installed (the API's default is a proxy)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class TracingMiddleware:
    def __init__(self, app: ASGIApp, *, tracer_name: str = "quiver.serving") -> None:
        self.app = app
        self.tracer_name = tracer_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing_enabled():
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        context = propagate.extract(carrier)
        tracer = trace.get_tracer(self.tracer_name)
        method = scope["method"]
        with tracer.start_as_current_span(f"{method} {scope['path']}", context=context,
                                          kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", method)
            span.set_attribute("url.path", scope["path"])
            span.set_attribute("quiver.request_id", request_id_var.get() or "")

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                await send(message)

            await self.app(scope, receive, traced_send)
            route = route_label(scope)
            span.set_attribute("http.route", route)
            span.update_name(f"{method} {route}")


def trace_headers() -> dict[str, str]:
    """W3C trace context of the current span, for engines and upstreams that trace on
    their own."""
    if not tracing_enabled():
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
