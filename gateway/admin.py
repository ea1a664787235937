"""The admin API under `/admin`: API keys, canary weights and the upstream replicas'
state, guarded by the admin key.

| method | path                               | body               | answer                   |
|--------|------------------------------------|--------------------|--------------------------|
| GET    | /admin/keys[?include_revoked=true] | -                  | 200 {"object", "data"}   |
| POST   | /admin/keys                        | CreateKeyBody      | 201 record + "key"       |
| DELETE | /admin/keys/{name}                 | -                  | 200 {"name", "revoked"}  |
| GET    | /admin/routes                      | -                  | 200 routes.snapshot()    |
| PUT    | /admin/routes/{model}/{variant}    | {"weight": 0..100} | 200 routes.snapshot()    |
| GET    | /admin/upstreams                   | -                  | 200 {"object", "data"}   |

`GET /admin/upstreams` lists every replica of every model and variant, in config order:
`model`, `variant`, `url`, `is_healthy`, `num_failed_health_checks` (in a row), `circuit`
(closed | open | half_open), `circuit_retry_in_s`, `num_outstanding`,
`num_consecutive_failures`, `recent_failures` (the last few failed attempts, newest
first: `outcome` connect_error | timeout | http_error | protocol_error, `seconds_ago`) and
`max_model_len` (the context length its `/v1/models` reported, which bounds token
estimates; null until read).

Every request needs `Authorization: Bearer <admin key>` (401 otherwise). With no admin key
configured, every `/admin` path answers 404. Bodies are validated strictly and a bad one is
a 400 in OpenAI's error shape. A key record never holds the hash; the secret appears once,
in the answer to POST.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from gateway.errors import AuthenticationError, BadRequestError, NotFoundError
from gateway.keys import (
    KEY_NAME_PATTERN,
    MAX_LIMIT,
    InvalidKeyError,
    KeyNameTakenError,
    KeyPriority,
    KeyStore,
    mint_key,
    public_record,
)
from gateway.middleware.auth import bearer_token

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class RoutesAdmin(Protocol):
    """What the admin API needs from the canary router (implemented in `gateway.routing`)."""

    def snapshot(self) -> dict[str, Any]:
        """Current routes as JSON-ready data: models, variants, weights, health, ..."""

    async def set_weight(self, model: str, variant: str, weight: float) -> None:
        """Set a variant's weight (percent); `NotFoundError` for an unknown model or
        variant, `BadRequestError` for a weight the router refuses, `RouteStateDownError`
        when the shared route state cannot be written."""


class UpstreamsAdmin(Protocol):
    """What the admin API needs from the upstream pool (`gateway.upstream.pool`)."""

    def replica_states(self) -> list[dict[str, Any]]:
        """Every replica's health, circuit, load and recent failures, JSON-ready."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CreateKeyBody(_Body):
    name: str = Field(pattern=KEY_NAME_PATTERN.pattern)
    models: list[str] = Field(default_factory=list)
    rpm: int | None = Field(None, ge=1, le=MAX_LIMIT)
    tpm: int | None = Field(None, ge=1, le=MAX_LIMIT)
    budget_tokens: int | None = Field(None, ge=1, le=MAX_LIMIT)
    owner: str | None = Field(None, min_length=1, max_length=256)
    can_pin_variant: bool = False
    max_concurrency: int | None = Field(None, ge=1, le=MAX_LIMIT)
    priority: KeyPriority = "normal"


class SetWeightBody(_Body):
    weight: float = Field(ge=0, le=100, allow_inf_nan=False)


def parse_body(model: type[ModelT], raw: bytes) -> ModelT:
    """`raw` JSON validated as `model`; the first problem becomes a `BadRequestError`."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        where = f"{param}: " if param else ""
        raise BadRequestError(f"invalid request body: {where}{error['msg']}",
                              param=param) from exc


def _parse_bool(value: str | None, param: str) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadRequestError(f"{param} must be true or false, got {value!r}", param=param)


def admin_guard(admin_key: SecretStr) -> Callable[[Request], Awaitable[None]]:
    expected = admin_key.get_secret_value().encode("utf-8")

    async def require_admin(request: Request) -> None:
        token = bearer_token(request.scope)
        if token is None:
            raise AuthenticationError(
                "missing admin key: send 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(token.encode("utf-8"), expected):
            raise AuthenticationError("invalid admin key")

    return require_admin


def _disabled_router() -> APIRouter:
    router = APIRouter(prefix="/admin")

    async def disabled() -> None:
        raise NotFoundError("the admin API is disabled", code="admin_disabled")

    router.add_api_route("", disabled, methods=_ALL_METHODS, include_in_schema=False)
    router.add_api_route("/{path:path}", disabled, methods=_ALL_METHODS,
                         include_in_schema=False)
    return router


def build_admin_router(*, admin_key: SecretStr | None, key_store: KeyStore,
                       routes: RoutesAdmin, upstreams: UpstreamsAdmin) -> APIRouter:
    """The `/admin` router; mount it with `app.include_router(...)` and install
    `gateway.errors.handle_api_error` for `ApiError` on the app."""
    if admin_key is None or not admin_key.get_secret_value():
        if admin_key is not None:
            logger.warning("admin_key is empty: the admin API is disabled")
        return _disabled_router()
    router = APIRouter(prefix="/admin", dependencies=[Depends(admin_guard(admin_key))])
    _add_key_routes(router, key_store)
    _add_route_routes(router, routes)

    @router.get("/upstreams")
    async def get_upstreams() -> JSONResponse:
        return JSONResponse({"object": "list", "data": upstreams.replica_states()})

    async def unknown(request: Request) -> None:
        raise NotFoundError(f"no admin endpoint {request.method} {request.url.path}")

    router.add_api_route("", unknown, methods=_ALL_METHODS, include_in_schema=False)
    router.add_api_route("/{path:path}", unknown, methods=_ALL_METHODS,
                         include_in_schema=False)
    return router


def _add_key_routes(router: APIRouter, key_store: KeyStore) -> None:
    @router.get("/keys")
    async def list_keys(request: Request) -> JSONResponse:
        include_revoked = _parse_bool(request.query_params.get("include_revoked"),
                                      "include_revoked")
        keys = await key_store.list_keys(include_revoked=include_revoked)
        return JSONResponse({"object": "list", "data": [public_record(key) for key in keys]})

    @router.post("/keys", status_code=201)
    async def create_key(request: Request) -> JSONResponse:
        body = parse_body(CreateKeyBody, await request.body())
        try:
            secret, key = mint_key(body.name, models=tuple(body.models), rpm=body.rpm,
                                   tpm=body.tpm, budget_tokens=body.budget_tokens,
                                   owner=body.owner, can_pin_variant=body.can_pin_variant,
                                   max_concurrency=body.max_concurrency,
                                   priority=body.priority)
            await key_store.create(key)
        except KeyNameTakenError as exc:
            raise BadRequestError(str(exc), param="name", code="key_name_taken") from exc
        except InvalidKeyError as exc:
            raise BadRequestError(str(exc)) from exc
        logger.info("admin: created API key %r", key.name)
        return JSONResponse({**public_record(key), "key": secret}, status_code=201,
                            headers={"cache-control": "no-store"})

    @router.delete("/keys/{name}")
    async def revoke_key(name: str) -> JSONResponse:
        if not await key_store.revoke(name):
            raise NotFoundError(f"no active key named {name!r}", param="name",
                                code="key_not_found")
        logger.info("admin: revoked API key %r", name)
        return JSONResponse({"name": name, "revoked": True})


def _add_route_routes(router: APIRouter, routes: RoutesAdmin) -> None:
    @router.get("/routes")
    async def get_routes() -> JSONResponse:
        return JSONResponse(routes.snapshot())

    # `model:path` lets a public model name hold slashes; the last segment is the variant.
    @router.put("/routes/{model:path}/{variant}")
    async def set_weight(model: str, variant: str, request: Request) -> JSONResponse:
        body = parse_body(SetWeightBody, await request.body())
        await routes.set_weight(model, variant, body.weight)
        logger.info("admin: set weight of %s/%s to %s", model, variant, body.weight)
        return JSONResponse(routes.snapshot())
