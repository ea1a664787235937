"""HTTP metrics: `<prefix>_http_requests_total{route,method,status}` and
`<prefix>_http_request_duration_seconds{route,method}` (prefix `quiver_server` or
`quiver_gateway`); `route` is the matched route's template (or `other`), so labels stay
bounded. A client gone before the response counts as status 499, a request the shutdown
cut off before it answered as 503 (what the request-id middleware then sends)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        except asyncio.CancelledError:  # the shutdown cut it off: answered 503 if unstarted
            if status["code"] == 499:
                status["code"] = 503
            raise
        except Exception:
            status["code"] = 500
            raise
        finally:
            route, method = route_label(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.duration.labels(route, method).observe(time.perf_counter() - start)
