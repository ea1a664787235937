"""The server's middleware, each a pure ASGI class (streaming and contextvars stay intact).

Composed once in `create_app`, outermost first:
`RequestIdMiddleware` -> `TracingMiddleware` -> `MetricsMiddleware` -> `BodySizeLimitMiddleware`.

- Request id: `x-request-id` echoed when the client sends a sane one, else minted; set in
  `request_id_var` for handlers and logs (`RequestIdLogFilter`), and sent on every response.
- Tracing: one OpenTelemetry SERVER span per request, child of the `traceparent` context.
  API only; nothing is created when no SDK tracer provider is installed.
- Metrics: `quiver_server_http_requests_total{route,method,status}` and
  `quiver_server_http_request_duration_seconds{route,method}`; `route` is the matched
  route's template (or `other`), so labels stay bounded. A client gone before the
  response counts as status 499.
- Body size: over `max_body_bytes` -> 413 in OpenAI's error shape.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.errors import InternalServerError, RequestTooLargeError, ServerError
from serving.protocol.errors import REQUEST_ID_HEADER, send_api_error

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Any

logger = logging.getLogger(__name__)
request_id_var: ContextVar[str | None] = ContextVar("quiver_request_id", default=None)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` (or "-"), and the current span's `trace_id` / `span_id` ("" when no
    span is recording), to every log record, for formats that show them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        else:
            record.trace_id = record.span_id = ""
        record.log_ids = (f"{record.request_id} trace={record.trace_id}" if record.trace_id
                          else record.request_id)
        return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(send: Any, error: ServerError, request_id: str | None = None) -> None:
    """A complete error response in OpenAI's shape, straight onto the ASGI `send`."""
    await send_api_error(send, error, request_id)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER)
        request_id = given if given and _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The last line of defence: a 500 that carries the request id, and a traceback.
            logger.exception("request %s failed", request_id)
            if started:
                raise
            await send_error(send, InternalServerError(request_id), request_id)
        finally:
            request_id_var.reset(token)


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = RequestTooLargeError(self.max_body_bytes)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await send_error(send, error, request_id_var.get())
            return
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["too_large"] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message: Message) -> None:
            if state["too_large"]:  # a chunked body ran over: answer 413, drop the app's reply
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await send_error(send, error, request_id_var.get())
                return
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


class HttpMetrics:
    """Per-route HTTP counters; `prefix` is `quiver_server` or `quiver_gateway`."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "quiver_server") -> None:
        self.requests = Counter(f"{prefix}_http_requests_total",
                                "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=registry)
        self.duration = Histogram(f"{prefix}_http_request_duration_seconds",
                                  "HTTP request duration until the response is complete",
                                  ["route", "method"], buckets=DURATION_BUCKETS,
                                  registry=registry)


def route_label(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 499}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            status["code"] = 500
            raise
        finally:
            route, method = route_label(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.duration.labels(route, method).observe(time.perf_counter() - start)


def tracing_enabled() -> bool:
    """True once an SDK tracer provider is installed (the API's default is a proxy)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class TracingMiddleware:
    def __init__(self, app: ASGIApp, *, tracer_name: str = "quiver.serving") -> None:
        self.app = app
        self.tracer_name = tracer_name

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
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
    """W3C trace context of the current span, for engines that trace on their own."""
    if not tracing_enabled():
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier

