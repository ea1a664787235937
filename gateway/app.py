"""`create_app(settings)`: the gateway's FastAPI app, its stores and its middleware stack.

Outermost first: request id -> tracing -> HTTP metrics -> verdict headers -> body size
limit -> auth (who) -> body (parse once) -> access (models, pinning, budget) -> rate limit
-> route (which variant) -> response cache -> admission (a slot of the variant, fair
between tenants when the upstreams are saturated) -> routes. The routes are the three proxied model
calls (chat, completions, embeddings), `/v1/models`, `/health`, `/ready`, `/metrics` (with
the admin key; Prometheus scrapes the `metrics_port`) and the admin API. Stores are opened
from the settings; the lifespan starts the key refresh and the upstream pool's health
checks, and on shutdown waits for in-flight calls' bookkeeping, then closes everything.
No trailing-slash redirects: they would be built from the client's `Host` header.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import Scope

from common.asgi import (
    BodySizeLimitMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    TracingMiddleware,
)
from common.errors import ApiError
from gateway.admin import admin_guard, build_admin_router
from gateway.admission import AdmissionCollector, AdmissionController, KeyLeases
from gateway.cache import ResponseCache
from gateway.context import MODEL_PATHS, InFlight, request_context
from gateway.errors import NotFoundError, handle_api_error, handle_http_exception
from gateway.keyring import KeyRing
from gateway.metrics import GatewayMetrics, KeyLimitsCollector, KeyStoreCollector
from gateway.middleware.access import AccessMiddleware
from gateway.middleware.admission import AdmissionMiddleware
from gateway.middleware.auth import AuthMiddleware
from gateway.middleware.body import BodyMiddleware
from gateway.middleware.cache import CacheMiddleware
from gateway.middleware.headers import ResponseHeadersMiddleware
from gateway.middleware.ratelimit import RateLimitMiddleware
from gateway.middleware.route import RouteMiddleware
from gateway.proxy import ProxyEndpoint
from gateway.ratelimit import RateLimiter
from gateway.routing.quality import Replayer
from gateway.routing.router import Router
from gateway.settings import GatewaySettings
from gateway.stores import (
    open_cache,
    open_key_leases,
    open_key_store,
    open_limiter,
    open_route_state,
)
from gateway.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)
BOOKKEEPING_WAIT_S = 5.0

@dataclass
class GatewayState:
    settings: GatewaySettings
    metrics: GatewayMetrics
    keyring: KeyRing
    limiter: RateLimiter
    cache: ResponseCache | None
    router: Router
    pool: UpstreamPool
    admission: AdmissionController
    key_leases: KeyLeases | None
    proxy: ProxyEndpoint
    in_flight: InFlight
    started_at: int
    draining: bool = False     # set on SIGTERM: /ready answers 503 while requests finish

    def is_ready(self) -> bool:
        """Not draining, and every model's stable variant can serve (a healthy replica
        that passed a check): a canary alone never makes the gateway ready."""
        if self.draining:
            return False
        return all(self.pool.can_serve(route.name, route.stable)
                   for route in self.settings.models)

    def context_tokens(self, model: str) -> int | None:
        """A model's context length for token estimates: configured, else reported."""
        for route in self.settings.models:
            if route.name == model and route.max_context_tokens is not None:
                return route.max_context_tokens
        return self.pool.context_tokens(model)

    async def close(self) -> None:
        # calls cut off at the end of the grace period finish their bookkeeping first
        if not await self.in_flight.wait_idle(BOOKKEEPING_WAIT_S):
            logger.warning("%d calls still in flight at shutdown: their usage may be lost",
                           self.in_flight.count)
        await self.proxy.close()
        await self.pool.close()
        await self.keyring.close()
        await self.router.state.close()
        if self.key_leases is not None:
            await self.key_leases.close()
        await self.limiter.close()
        if self.cache is not None:
            await self.cache.close()


def build_state(settings: GatewaySettings) -> GatewayState:
    metrics = GatewayMetrics()
    # samples shared between replicas carry wall-clock times; one process's, monotonic ones
    clock = time.time if settings.routing.backend == "redis" else time.monotonic
    router = Router(settings.models, settings.rollback, metrics, clock=clock,
                    state=open_route_state(settings, metrics))
    pool = UpstreamPool(settings, metrics)
    keyring = KeyRing(open_key_store(settings.key_store,
                                     timeout_s=settings.redis_timeout_seconds),
                      refresh_seconds=settings.key_refresh_seconds)
    metrics.registry.register(KeyLimitsCollector(
        keyring, default_rpm=settings.rate_limit.default_rpm,
        default_tpm=settings.rate_limit.default_tpm))
    metrics.registry.register(KeyStoreCollector(keyring))
    metrics.watch_rate_limiter(settings.rate_limit.failure_mode)
    variants = [(route.name, v.name) for route in settings.models for v in route.variants]
    admission = AdmissionController(settings.admission, metrics, pool.capacity,
                                    variants=variants)
    metrics.registry.register(AdmissionCollector(admission, variants))
    quality = settings.rollback.quality
    replayer = (Replayer(quality, settings.models, router=router, pool=pool, metrics=metrics)
                if quality.enabled else None)
    return GatewayState(
        settings=settings, metrics=metrics, keyring=keyring,
        limiter=open_limiter(settings), cache=open_cache(settings, metrics), router=router,
        pool=pool, admission=admission, key_leases=open_key_leases(settings),
        proxy=ProxyEndpoint(router=router, pool=pool, metrics=metrics, replayer=replayer),
        in_flight=InFlight(), started_at=int(time.time()))


class ProxyRoute(Route):
    """A plain ASGI route that, like FastAPI's, puts itself in the scope (metric and span
    labels use its path template)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def add_routes(app: FastAPI, state: GatewayState) -> None:
    for path in sorted(MODEL_PATHS):
        app.router.routes.append(ProxyRoute(path, state.proxy, methods=["POST"]))

    def visible_models(request: Request) -> list[dict[str, Any]]:
        key = request_context(request.scope).key
        return [{"id": name, "object": "model", "created": state.started_at,
                 "owned_by": "quiver"}
                for name in state.router.model_names() if key is None or key.allows_model(name)]

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": visible_models(request)})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> JSONResponse:
        for entry in visible_models(request):
            if entry["id"] == model:
                return JSONResponse(entry)
        raise NotFoundError(f"The model `{model}` does not exist or this key may not use it.",
                            param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        is_ready = state.is_ready()
        return JSONResponse({"status": "ready" if is_ready else "unavailable"},
                            status_code=200 if is_ready else 503)

    admin_key = state.settings.admin_key
    guard = admin_guard(admin_key) if admin_key and admin_key.get_secret_value() else None

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if guard is None:
            raise NotFoundError("/metrics is served on the gateway's metrics_port, or here "
                                "with the admin key (none is set).", code="not_found")
        await guard(request)
        return Response(generate_latest(state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)


def create_app(settings: GatewaySettings) -> FastAPI:
    state = build_state(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.keyring.start()
        await state.router.state.start()
        if state.key_leases is not None:
            await state.key_leases.start()
        await state.pool.start()
        try:
            yield
        finally:
            await state.close()

    # FastAPI's own telemetry would add a second server span per request.
    app = FastAPI(title="Quiver gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False,
                             "auto_configure": False})
    app.router.redirect_slashes = False
    app.state.gateway = state
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    add_routes(app, state)
    app.include_router(build_admin_router(admin_key=settings.admin_key,
                                          key_store=state.keyring.store, routes=state.router,
                                          upstreams=state.pool))
    wrap_middleware(app, state)
    return app


def wrap_middleware(app: FastAPI, state: GatewayState) -> None:
    """Starlette applies `add_middleware` last-added-outermost: listed innermost first."""
    settings, metrics = state.settings, state.metrics
    app.add_middleware(AdmissionMiddleware, admission=state.admission, leases=state.key_leases)
    app.add_middleware(CacheMiddleware, cache=state.cache, settings=settings.cache,
                       metrics=metrics)
    app.add_middleware(RouteMiddleware, router=state.router)
    app.add_middleware(RateLimitMiddleware, limiter=state.limiter,
                       settings=settings.rate_limit, metrics=metrics)
    app.add_middleware(AccessMiddleware, keyring=state.keyring, settings=settings.rate_limit,
                       metrics=metrics, context_tokens=state.context_tokens,
                       in_flight=state.in_flight)
    app.add_middleware(BodyMiddleware)
    app.add_middleware(AuthMiddleware, keyring=state.keyring, metrics=metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ResponseHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics.http)
    app.add_middleware(TracingMiddleware, tracer_name="quiver.gateway")
    app.add_middleware(RequestIdMiddleware)
