"""The engine's part of a request's trace: `queue`, `prefill` and `decode` child spans.

Made after the fact from the milestones the engine reports on a request's final output
(`RequestOutput.times`), as children of the current (server) span, so they join the trace
the client's `traceparent` started. Nothing is done when the current span is not recording
(no SDK tracer provider installed): tracing off costs one attribute lookup per request.
"""

from __future__ import annotations

from opentelemetry import trace

from serving.engine.outputs import RequestTimes

TRACER_NAME = "quiver.serving"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def record_engine_spans(times: RequestTimes, *, request_id: str) -> None:
    if not trace.get_current_span().is_recording():
        return
    tracer = trace.get_tracer(TRACER_NAME)
    phases = (
        ("queue", times.arrival_time, times.first_scheduled_time),
        ("prefill", times.first_scheduled_time, times.first_token_time),
        ("decode", times.first_token_time, times.finished_time),
    )
    for name, start, end in phases:
        if start is None or end is None:
            continue
        span = tracer.start_span(name, start_time=_ns(start),
                                 attributes={"quiver.engine_request_id": request_id})
        span.end(end_time=_ns(max(start, end)))
