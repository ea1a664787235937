"""Relaying one routed call through the upstream pool, unary or streamed.

Unary: the pool retries across replicas; the answer must be JSON (garbage -> 502 in
OpenAI's shape); an upstream error body in OpenAI's shape passes through with its status.
Streamed: events pass through one by one as they arrive, never buffered; once the stream
has started, an upstream failure (or a stream that ends without `[DONE]`) ends it with an
error event, never a silent cut. Both record usage, the outcome for canary rollback, and
the gateway's request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

from common.asgi import trace_headers, tracing_enabled
from common.errors import ErrorResponse, send_api_error
from gateway.context import RequestContext
from gateway.errors import GatewayError, UpstreamError
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteDecision
from gateway.routing.router import Router
from gateway.sse import EventSplitter, carries_text, error_event, inspect_event, without_null_usage
from gateway.upstream.pool import UpstreamPool, UpstreamStream, UpstreamStreamError

logger = logging.getLogger(__name__)
JSON = b"application/json"
STREAM_START_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@contextlib.contextmanager
def upstream_span(decision: RouteDecision, *, is_stream: bool) -> Iterator[trace.Span | None]:
    """A CLIENT span around the upstream call (its context goes upstream in `traceparent`)."""
    if not tracing_enabled():
        yield None
        return
    tracer = trace.get_tracer("quiver.gateway")
    with tracer.start_as_current_span(
            f"upstream {decision.model}/{decision.variant}", kind=trace.SpanKind.CLIENT,
            attributes={"quiver.model": decision.model, "quiver.variant": decision.variant,
                        "quiver.stream": is_stream}) as span:
        yield span


def end_span(span: trace.Span | None, status: int, replica: str | None = None) -> None:
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if replica:
        span.set_attribute("server.address", replica)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def record_usage(context: RequestContext, usage: Any) -> None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        context.prompt_tokens = prompt if isinstance(prompt, int) else 0
        context.completion_tokens = completion if isinstance(completion, int) else 0


def upstream_error_body(status: int, body: bytes, variant: str) -> bytes:
    """An upstream's error answer in OpenAI's shape: as it is, from vLLM's flat shape, or
    (for a 4xx) its text wrapped; a 5xx with a body that is no error at all is a 502."""
    payload = parse_json_object(body)
    if payload is not None and isinstance(payload.get("error"), dict):
        return body
    if payload is not None and isinstance(payload.get("message"), str):  # vLLM: flat
        code, param = payload.get("code"), payload.get("param")
        error = ErrorResponse.of(payload["message"], str(payload.get("type") or "upstream_error"),
                                 param=param if isinstance(param, str) else None,
                                 code=None if code is None else str(code))
        return error.model_dump_json().encode()
    if status >= 500:
        raise UpstreamError(f"The upstream for variant {variant!r} answered {status} with a "
                            "body that is not an OpenAI error.")
    text = body.decode("utf-8", errors="replace").strip()[:500] or f"HTTP {status}"
    error_type = "rate_limit_error" if status == 429 else "invalid_request_error"
    return ErrorResponse.of(text, error_type, code="upstream_error").model_dump_json().encode()


def json_messages(status: int, body: bytes,
                  upstream_headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A JSON answer as ASGI messages; an upstream's Retry-After goes along."""
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    retry_after = (upstream_headers or {}).get("retry-after")
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode("latin-1")))
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body}]


class Relay:
    def __init__(self, *, pool: UpstreamPool, router: Router, metrics: GatewayMetrics) -> None:
        self.pool = pool
        self.router = router
        self.metrics = metrics

    def observe(self, context: RequestContext, decision: RouteDecision, status: int,
                started: float, first_byte: float | None = None,
                first_token: float | None = None) -> None:
        now = time.perf_counter()
        labels = (decision.model, decision.variant)
        key_name = context.key.name if context.key is not None else ""
        self.metrics.requests.labels(*labels, key_name, str(status)).inc()
        self.metrics.request_duration.labels(*labels).observe(now - started)
        if first_byte is not None:
            self.metrics.time_to_first_byte.labels(*labels).observe(first_byte - started)
        if first_token is not None:
            self.metrics.time_to_first_token.labels(*labels).observe(first_token - started)
        self.router.record(decision.model, decision.variant, is_error=status >= 500,
                           latency_s=now - started)

    async def unary(self, send: Any, context: RequestContext, decision: RouteDecision,
                    path: str, body: bytes, headers: dict[str, str]) -> None:
        with upstream_span(decision, is_stream=False) as span:
            await self._unary(send, context, decision, path, body,
                              {**headers, **trace_headers()}, span)

    async def _unary(self, send: Any, context: RequestContext, decision: RouteDecision,
                     path: str, body: bytes, headers: dict[str, str],
                     span: trace.Span | None) -> None:
        started = time.perf_counter()
        try:
            result = await self.pool.fetch(decision.model, decision.variant, path, body, headers)
            answer = result.body
            if result.status == 200:
                payload = parse_json_object(answer)
                if payload is None:
                    raise UpstreamError(f"The upstream for variant {decision.variant!r} "
                                        "answered 200 with a body that is not JSON.")
                record_usage(context, payload.get("usage"))
                context.is_complete = True
            else:
                answer = upstream_error_body(result.status, answer, decision.variant)
        except GatewayError as error:
            end_span(span, error.status_code)
            self.observe(context, decision, error.status_code, started)
            await send_api_error(send, error)
            return
        end_span(span, result.status, result.replica)
        self.observe(context, decision, result.status, started, time.perf_counter())
        for message in json_messages(result.status, answer, result.headers):
            await send(message)

    async def stream(self, send: Any, context: RequestContext, decision: RouteDecision,
                     path: str, body: bytes, headers: dict[str, str], *,
                     wants_usage: bool) -> None:
        with upstream_span(decision, is_stream=True) as span:
            await self._stream(send, context, decision, path, body,
                               {**headers, **trace_headers()}, wants_usage, span)

    async def _stream(self, send: Any, context: RequestContext, decision: RouteDecision,
                      path: str, body: bytes, headers: dict[str, str], wants_usage: bool,
                      span: trace.Span | None) -> None:
        started = time.perf_counter()
        try:
            stream = await self.pool.open_stream(decision.model, decision.variant, path, body,
                                                 headers)
        except GatewayError as error:
            end_span(span, error.status_code)
            self.observe(context, decision, error.status_code, started)
            await send_api_error(send, error)
            return
        end_span(span, stream.status, stream.replica)
        try:
            if stream.status != 200:
                await self.relay_error(send, context, decision, stream, started)
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": list(STREAM_START_HEADERS)})
            first_byte, first_token = await self.pump(send, context, decision, stream,
                                                      wants_usage)
            status = 200 if context.is_complete else 502
            self.observe(context, decision, status, started, first_byte, first_token)
        finally:
            await stream.aclose()

    async def relay_error(self, send: Any, context: RequestContext, decision: RouteDecision,
                          stream: UpstreamStream, started: float) -> None:
        try:
            answer = upstream_error_body(stream.status, await stream.read(), decision.variant)
        except (GatewayError, UpstreamStreamError) as exc:
            error = exc if isinstance(exc, GatewayError) else UpstreamError(str(exc))
            self.observe(context, decision, error.status_code, started)
            await send_api_error(send, error)
            return
        self.observe(context, decision, stream.status, started)
        for message in json_messages(stream.status, answer, stream.headers):
            await send(message)

    async def pump(self, send: Any, context: RequestContext, decision: RouteDecision,
                   stream: UpstreamStream,
                   wants_usage: bool) -> tuple[float | None, float | None]:
        """Events out as they come; returns when the first byte and the first text came."""
        splitter, first_byte, first_token, failure = EventSplitter(), None, None, None
        saw_done = saw_error = False
        try:
            async for chunk in stream:
                first_byte = first_byte or time.perf_counter()
                out = []
                for event in splitter.feed(chunk):
                    info = inspect_event(event)
                    saw_done = saw_done or info.is_done
                    saw_error = saw_error or info.is_error
                    if first_token is None and carries_text(event):
                        first_token = time.perf_counter()
                    if info.usage is not None:
                        record_usage(context, info.usage)
                    if wants_usage:
                        out.append(event)
                    elif not info.is_usage_only:
                        out.append(without_null_usage(event))
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out),
                                "more_body": True})
        except UpstreamStreamError as exc:
            failure = str(exc)
        except asyncio.CancelledError:  # client gone (harmless) or the gateway shutting down
            await send({"type": "http.response.body", "more_body": False,
                        "body": error_event("The gateway stopped this stream (shutting down "
                                            "or cancelled).", code="stream_cancelled")})
            raise
        if failure is None and not saw_done:
            failure = "the upstream closed the stream before it finished"
        tail = b""
        if failure is not None and not saw_error:
            self.metrics.stream_errors.labels(decision.model, decision.variant).inc()
            logger.warning("stream from variant %r failed: %s", decision.variant, failure)
            tail = error_event(f"The upstream for variant {decision.variant!r} failed "
                               f"mid-stream: {failure}.")
        context.is_complete = failure is None and saw_done and not saw_error
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return first_byte, first_token

    async def shadow(self, decision: RouteDecision, path: str, body: dict[str, Any],
                     headers: dict[str, str]) -> None:
        variant = decision.shadow_variant
        assert variant is not None
        payload = json.dumps(body, separators=(",", ":")).encode()
        try:
            result = await self.pool.fetch(decision.model, variant, path, payload, headers)
            outcome = "ok" if result.status < 500 else "error"
        except GatewayError:
            outcome = "error"
        self.metrics.shadow_requests.labels(decision.model, variant, outcome).inc()
