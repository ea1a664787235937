"""Child spans for the gateway's phases (auth, rate limit, cache, route) under the server
span. Each covers its own decision only, never the rest of the chain, so a trace shows
where the gateway's own time went. Nothing is created when the current span is not
recording (tracing off): one attribute lookup per phase."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace

TRACER_NAME = "quiver.gateway"


@contextmanager
def phase_span(name: str) -> Iterator[trace.Span | None]:
    if not trace.get_current_span().is_recording():
        yield None
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
            f"gateway.{name}", kind=trace.SpanKind.INTERNAL) as span:
        yield span


def set_attributes(span: trace.Span | None, **attributes: str | int | float | bool) -> None:
    if span is not None:
        for name, value in attributes.items():
            span.set_attribute(f"quiver.{name}", value)
