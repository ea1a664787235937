"""Relaying one routed call through the upstream pool, unary or streamed.

Unary: the pool retries across replicas; the answer must be JSON (garbage -> 502 in
OpenAI's shape); an upstream error body in OpenAI's shape passes through with its status.
Streamed: events pass through one by one as they arrive, never buffered; once the stream
has started, an upstream failure (or a stream that ends without `[DONE]`) ends it with an
error event, never a silent cut. Both record usage, the outcome for canary rollback, and
the gateway's request metrics, once, for the model that answered.

Fallbacks (`routing.fallback`): when the routed model cannot answer (no healthy replica,
5xx, timeout, prompt over its context) and it has fallbacks the key may use, the next one
gets the call, its body's `model` rewritten, before any byte went to the client; streams
fall back only until their response starts. The failed model's variant is judged for
canary rollback as a failed call; the call is counted and charged once, to the answer.

Usage: the server's own count when it sent one. A stream cut short (the client left, the
upstream broke, the gateway shut down) is charged its estimated prompt plus every
completion token delivered: one per generated-output delta sent on (`sse.count_output`),
which is exact for servers that stream a token per chunk, as Quiver's and vLLM's do; one
that delivered no token is charged nothing, as is a unary call cut off before its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from starlette.types import Message, Send

from common.asgi import trace_headers, tracing_enabled
from common.errors import ErrorResponse, send_api_error
from gateway.context import RequestContext
from gateway.errors import GatewayError, UpstreamError
from gateway.estimate import EMBEDDINGS_PATH
from gateway.metrics import GatewayMetrics
from gateway.routing import CallOutcome, RouteDecision
from gateway.routing.fallback import FallbackReason, reason_for_answer, reason_for_error
from gateway.routing.router import Router
from gateway.sse import (
    EventInfo,
    EventSplitter,
    count_output,
    error_event,
    inspect_event,
    without_null_usage,
)
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


def record_usage(context: RequestContext, usage: Any) -> bool:
    """The server's usage object into the context; False when there is none."""
    if not isinstance(usage, dict):
        return False
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    context.prompt_tokens = prompt if isinstance(prompt, int) else 0
    context.completion_tokens = completion if isinstance(completion, int) else 0
    return True


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
                  upstream_headers: dict[str, str] | None = None) -> list[Message]:
    """A JSON answer as ASGI messages; an upstream's Retry-After goes along."""
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    retry_after = (upstream_headers or {}).get("retry-after")
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode("latin-1")))
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body}]


async def send_json(send: Send, status: int, body: bytes,
                    upstream_headers: dict[str, str]) -> None:
    for message in json_messages(status, body, upstream_headers):
        await send(message)


@dataclass(frozen=True)
class RelayCall:
    """One routed call on its way through the relay, built once by `Relay.forward` and
    handed down the chain (as `UpstreamPool` hands down its `_Call`)."""

    send: Send
    context: RequestContext    # usage and completeness are recorded here
    decision: RouteDecision
    path: str
    body: bytes                # what goes to the variant's replicas
    headers: dict[str, str]    # what goes upstream, with the client span's trace context
    is_stream: bool
    wants_usage: bool          # the client asked for the usage chunk (streams)
    span: trace.Span | None    # the CLIENT span around the upstream call; None untraced
    started: float             # perf_counter when the upstream call began
    may_fall_back: bool = False  # a fallback model is left to try if this one cannot answer
    affinity: str | None = None  # keeps it with calls sharing its prefix or session


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@dataclass
class StreamTally:
    """What a relayed stream delivered, counted as it went."""

    first_byte: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_token_events: int = 0      # events sent on with generated output
    num_tokens: int = 0            # generated-output deltas in them (a token each)
    saw_done: bool = False
    saw_error: bool = False
    is_client_error: bool = False  # the upstream's error event blamed the request
    has_usage: bool = False        # the server's usage object came

    def sent(self, event: bytes, now: float) -> None:
        num_tokens = count_output(event)
        if num_tokens:
            self.first_token = self.first_token or now
            self.last_token = now
            self.num_token_events += 1
            self.num_tokens += num_tokens

    def seen(self, info: EventInfo) -> None:
        self.saw_done = self.saw_done or info.is_done
        self.saw_error = self.saw_error or info.is_error
        self.is_client_error = self.is_client_error or info.is_client_error

    def charge_delivered(self, context: RequestContext) -> None:
        """Without the server's count: the estimated prompt + every token sent on (nothing
        when no token went out: the client received nothing)."""
        if not self.has_usage and self.num_tokens:
            context.prompt_tokens = context.estimated_prompt_tokens
            context.completion_tokens = self.num_tokens


class Relay:
    def __init__(self, *, pool: UpstreamPool, router: Router, metrics: GatewayMetrics) -> None:
        self.pool = pool
        self.router = router
        self.metrics = metrics

    async def forward(self, send: Send, context: RequestContext, decision: RouteDecision, *,
                      path: str, body_for: Callable[[RouteDecision], bytes],
                      headers: dict[str, str], affinity: str | None = None) -> None:
        """Relay one routed call and answer the client, streamed when its body asks; when
        the routed model cannot answer, its fallbacks try in turn (`routing.fallback`)."""
        client_body = context.body or {}
        is_stream = client_body.get("stream") is True and path != EMBEDDINGS_PATH
        chain = [decision, *self._fallback_decisions(context, decision.model)]
        for index, current in enumerate(chain):
            if index > 0:
                context.fallback_model, context.variant = current.model, current.variant
            with upstream_span(current, is_stream=is_stream) as span:
                call = RelayCall(send=send, context=context, decision=current, path=path,
                                 body=body_for(current), headers={**headers, **trace_headers()},
                                 is_stream=is_stream, wants_usage=wants_usage(client_body),
                                 span=span, started=time.perf_counter(),
                                 may_fall_back=index + 1 < len(chain), affinity=affinity)
                reason = await (self._stream(call) if is_stream else self._unary(call))
            if reason is None:
                return
            self._fell_back(call, chain[index + 1].model, reason)

    def _fallback_decisions(self, context: RequestContext, model: str) -> list[RouteDecision]:
        key = context.key
        return [self.router.choose(name, context.sticky_key, may_shadow=False)
                for name in self.router.fallbacks(model)
                if key is None or key.allows_model(name)]

    def _fell_back(self, call: RelayCall, fallback: str, reason: FallbackReason) -> None:
        """The routed model (or the last fallback) could not answer: count it, and judge
        the variant for a failure that was its own."""
        decision, context = call.decision, call.context
        logger.warning("model %s variant %s could not answer (%s): falling back to %s",
                       decision.model, decision.variant, reason, fallback)
        self.metrics.fallbacks.labels(model=context.model, fallback=fallback,
                                      reason=reason).inc()
        if reason != "context_length":
            key_name = context.key.name if context.key is not None else ""
            self.router.record(decision.model, decision.variant,
                               CallOutcome(key_name, is_error=True))

    def observe(self, call: RelayCall, status: int, first_byte: float | None = None,
                tally: StreamTally | None = None) -> None:
        now = time.perf_counter()
        decision, context = call.decision, call.context
        labels = (decision.model, decision.variant)
        key_name = context.key.name if context.key is not None else ""
        self.metrics.requests.labels(*labels, key_name, str(status)).inc()
        self.metrics.request_duration.labels(*labels).observe(now - call.started)
        first_byte = tally.first_byte if tally is not None else first_byte
        if first_byte is not None:
            self.metrics.time_to_first_byte.labels(*labels).observe(first_byte - call.started)
        if tally is not None and tally.first_token is not None:
            self.metrics.time_to_first_token.labels(*labels).observe(
                tally.first_token - call.started)
        outcome = self.outcome(call, status, now, tally)
        if outcome is not None:
            self.router.record(decision.model, decision.variant, outcome)

    def outcome(self, call: RelayCall, status: int, now: float,
                tally: StreamTally | None) -> CallOutcome | None:
        """The call as canary judging sees it; None for the client's own errors."""
        context = call.context
        key_name = context.key.name if context.key is not None else ""
        if tally is not None and tally.is_client_error:
            return None
        if status >= 500:
            return CallOutcome(key_name, is_error=True)
        if status != 200:
            return None
        if call.path == EMBEDDINGS_PATH:
            return CallOutcome(key_name, is_error=False)
        if tally is None:  # unary: its duration per output token
            per_token = (now - call.started) / max(1, context.completion_tokens)
            return CallOutcome(key_name, is_error=False, itl_s=per_token)
        ttft = None if tally.first_token is None else tally.first_token - call.started
        itl = None
        if tally.num_token_events >= 2 and tally.first_token and tally.last_token:
            itl = (tally.last_token - tally.first_token) / (tally.num_token_events - 1)
        return CallOutcome(key_name, is_error=False, ttft_s=ttft, itl_s=itl)

    async def _unary(self, call: RelayCall) -> FallbackReason | None:
        """Answer the client, or (when it may) say why a fallback should try instead."""
        decision = call.decision
        try:
            result = await self.pool.fetch(decision.model, decision.variant, call.path,
                                           call.body, call.headers, affinity=call.affinity)
            answer = result.body
            reason = reason_for_answer(result.status, answer)
            if reason is not None and call.may_fall_back:
                end_span(call.span, result.status, result.replica)
                return reason
            if result.status == 200:
                payload = parse_json_object(answer)
                if payload is None:
                    raise UpstreamError(f"The upstream for variant {decision.variant!r} "
                                        "answered 200 with a body that is not JSON.")
                record_usage(call.context, payload.get("usage"))
                call.context.is_complete = True
            else:
                answer = upstream_error_body(result.status, answer, decision.variant)
        except GatewayError as error:
            return await self._fail(call, error)
        end_span(call.span, result.status, result.replica)
        self.observe(call, result.status, time.perf_counter())
        await send_json(call.send, result.status, answer, result.headers)
        return None

    async def _stream(self, call: RelayCall) -> FallbackReason | None:
        """As `_unary`; a fallback may try only until the response starts."""
        decision = call.decision
        try:
            stream = await self.pool.open_stream(decision.model, decision.variant, call.path,
                                                 call.body, call.headers,
                                                 affinity=call.affinity)
        except GatewayError as error:
            return await self._fail(call, error)
        end_span(call.span, stream.status, stream.replica)
        try:
            if stream.status != 200:
                return await self._relay_error(call, stream)
            await call.send({"type": "http.response.start", "status": 200,
                             "headers": list(STREAM_START_HEADERS)})
            tally = await self._pump(call, stream)
            self.observe(call, 200 if call.context.is_complete else 502, tally=tally)
            return None
        finally:
            await stream.aclose()

    async def _relay_error(self, call: RelayCall,
                           stream: UpstreamStream) -> FallbackReason | None:
        try:
            body = await stream.read()
        except UpstreamStreamError as exc:
            return await self._fail(call, UpstreamError(str(exc)))
        reason = reason_for_answer(stream.status, body)
        if reason is not None and call.may_fall_back:
            return reason
        try:
            answer = upstream_error_body(stream.status, body, call.decision.variant)
        except GatewayError as error:
            return await self._fail(call, error)
        self.observe(call, stream.status)
        await send_json(call.send, stream.status, answer, stream.headers)
        return None

    async def _fail(self, call: RelayCall, error: GatewayError) -> FallbackReason | None:
        """The gateway's own error: a fallback's turn when it may, else the answer."""
        end_span(call.span, error.status_code)
        reason = reason_for_error(error)
        if reason is not None and call.may_fall_back:
            return reason
        await self._send_error(call, error)
        return None

    async def _send_error(self, call: RelayCall, error: GatewayError) -> None:
        """The gateway's own error answer, before any byte went out; counted as such."""
        self.observe(call, error.status_code)
        await send_api_error(call.send, error)

    async def _pump(self, call: RelayCall, stream: UpstreamStream) -> StreamTally:
        """Events out as they come, counted in the returned tally."""
        context, send = call.context, call.send
        splitter, tally, failure = EventSplitter(), StreamTally(), None
        try:
            async for chunk in stream:
                tally.first_byte = tally.first_byte or time.perf_counter()
                passed = (self._passed_on(call, tally, event) for event in splitter.feed(chunk))
                out = [event for event in passed if event is not None]
                if out:
                    now = time.perf_counter()
                    for event in out:  # counted before it goes: charged even if cut off
                        tally.sent(event, now)
                    await send({"type": "http.response.body", "body": b"".join(out),
                                "more_body": True})
        except UpstreamStreamError as exc:
            failure = str(exc)
        except asyncio.CancelledError:  # client gone (harmless) or the gateway shutting down
            tally.charge_delivered(context)
            await send({"type": "http.response.body", "more_body": False,
                        "body": error_event("The gateway stopped this stream (shutting down "
                                            "or cancelled).", code="stream_cancelled")})
            raise
        if failure is None and not tally.saw_done:
            failure = "the upstream closed the stream before it finished"
        tail = b""
        if failure is not None and not tally.saw_error:
            decision = call.decision
            self.metrics.stream_errors.labels(decision.model, decision.variant).inc()
            logger.warning("stream from variant %r failed: %s", decision.variant, failure)
            tail = error_event(f"The upstream for variant {decision.variant!r} failed "
                               f"mid-stream: {failure}.")
        context.is_complete = failure is None and tally.saw_done and not tally.saw_error
        tally.charge_delivered(context)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return tally

    def _passed_on(self, call: RelayCall, tally: StreamTally, event: bytes) -> bytes | None:
        """The event as the client gets it (None: dropped), its facts noted."""
        info = inspect_event(event)
        tally.seen(info)
        if info.usage is not None:
            tally.has_usage = record_usage(call.context, info.usage)
        if call.wants_usage:
            return event
        return None if info.is_usage_only else without_null_usage(event)

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
