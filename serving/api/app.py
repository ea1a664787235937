"""`create_app(settings, engine, tokenizer, registry) -> FastAPI`: the model server's app.

Everything is built here once: the `ServerState` on `app.state.server`, the routers
(health, OpenAI, and KServe v2 when `serving.api.kserve_routes` exists), the error
mapping (every error in OpenAI's shape; validation errors are 400s naming the `param`,
never 422s) and the middleware stack. The caller owns the engine and shuts it down.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.asgi import (
    BodySizeLimitMiddleware,
    HttpMetrics,
    MetricsMiddleware,
    RequestIdMiddleware,
    TracingMiddleware,
)
from common.errors import ApiError, ErrorResponse
from serving.api import health, openai_routes
from serving.api.state import ServerState
from serving.backends.base import EngineClient
from serving.errors import BadRequestError, NotFoundError
from serving.settings import ServerSettings

logger = logging.getLogger(__name__)
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# Pydantic's union-member tags in an error location are not parameter names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def create_app(settings: ServerSettings, engine: EngineClient, tokenizer: Any,
               registry: CollectorRegistry) -> FastAPI:
    # Our middleware owns the server span (with request id and bounded route names);
    # FastAPI's own telemetry would add a second server span per request.
    app = FastAPI(title="Quiver model server", docs_url=None, redoc_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False,
                             "auto_configure": False})
    state = ServerState(settings=settings, engine=engine, tokenizer=tokenizer,
                        registry=registry, http_metrics=HttpMetrics(registry),
                        vocab_size=vocab_size(tokenizer, engine.info.model_dir))
    app.state.server = state
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    if importlib.util.find_spec("serving.api.kserve_routes") is not None:
        from serving.api import kserve_routes

        app.include_router(kserve_routes.router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # add_middleware wraps what is there: the last one added runs first.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.http_metrics)
    app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app


def vocab_size(tokenizer: Any, model_dir: Path | None) -> int:
    """Token ids a prompt may use: the tokenizer's, capped by the model's embedding size."""
    size = len(tokenizer)
    config = Path(model_dir) / "config.json" if model_dir else None
    if config is not None and config.is_file():
        model_vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
        if isinstance(model_vocab, int) and model_vocab > 0:
            size = min(size, model_vocab)
    return size


def error_json(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_response().model_dump(), status_code=error.status_code,
                        headers=error.headers())


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_json(exc)


def param_of(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and _FIELD_NAME.fullmatch(part) and part not in _TYPE_TAGS:
            param += f".{part}" if param else part
    return param or None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "invalid JSON")
        return error_json(BadRequestError(
            f"We could not parse the JSON body of your request: {detail}",
            code="invalid_json"))
    param = param_of(tuple(first["loc"]))
    if param is None:
        message = "The request body must be a JSON object"
    elif first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"Invalid value for '{param}': {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_json(BadRequestError(message, param=param))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_json(NotFoundError(f"no route for {request.method} {request.url.path}"))
    body = ErrorResponse.of(str(exc.detail), "invalid_request_error")
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)
