"""Pure-ASGI middlewares both servers compose (streaming and contextvars stay intact).

Outermost first, as `serving.api.app` and `gateway.app` stack them:
`RequestIdMiddleware` -> `TracingMiddleware` -> `MetricsMiddleware` ->
`BodySizeLimitMiddleware` (the gateway adds its own below these). One class per module;
`disconnect` runs work until the client goes away.
"""

from common.asgi.body_limit import BodySizeLimitMiddleware
from common.asgi.metrics import DURATION_BUCKETS, HttpMetrics, MetricsMiddleware, route_label
from common.asgi.request_id import RequestIdLogFilter, RequestIdMiddleware, request_id_var
from common.asgi.tracing import TracingMiddleware, trace_headers, tracing_enabled

__all__ = [
    "DURATION_BUCKETS",
    "BodySizeLimitMiddleware",
    "HttpMetrics",
    "MetricsMiddleware",
    "RequestIdLogFilter",
    "RequestIdMiddleware",
    "TracingMiddleware",
    "request_id_var",
    "route_label",
    "trace_headers",
    "tracing_enabled",
]
