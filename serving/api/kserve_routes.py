"""KServe v2 and Triton generate endpoints: thin HTTP over `serving.handlers.kserve`.

Health answers 200 (true) or 400 (false) with an empty body, as KServe v2 says; a
draining server is not ready and refuses new generations (503). Every
error is `{"error": "<message>"}` with the status `serving.errors` gives it (unknown model
404, bad input 400, queue full 503 + Retry-After, ...). Every model route also answers
under `/versions/1`. Every request runs until its client disconnects: then its engine
requests are aborted (`serving.api.responses`, as for the OpenAI routes).
"""

from __future__ import annotations

import logging
import uuid
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from common.asgi import request_id_var
from common.asgi.disconnect import ClientDisconnectedError, until_disconnect
from serving.api.responses import CLIENT_CLOSED_REQUEST, event_stream
from serving.errors import BadRequestError, InternalServerError, from_exception
from serving.handlers.kserve import KServeHandler
from serving.protocol.kserve import (
    HEADER_LENGTH,
    ErrorResponse,
    InferRequest,
    TritonGenerateRequest,
)

logger = logging.getLogger(__name__)
router = APIRouter(tags=["kserve"])

MODEL = "/v2/models/{name}"
VERSIONED_MODEL = "/v2/models/{name}/versions/{version}"

ModelT = TypeVar("ModelT", bound=BaseModel)


def _handler(request: Request) -> KServeHandler:
    return request.app.state.server.kserve


def _generation_handler(request: Request) -> KServeHandler:
    """As `_handler`, refusing new generations once the server drains for shutdown."""
    request.app.state.server.check_accepting()
    return _handler(request)


def _request_id(request: Request) -> str:
    return request_id_var.get() or request.headers.get("x-request-id") or uuid.uuid4().hex


def _error_response(exc: BaseException, request: Request) -> Response:
    if isinstance(exc, ClientDisconnectedError):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    error = from_exception(exc, request_id=_request_id(request), prompt_param="text_input")
    if isinstance(error, InternalServerError):
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = ErrorResponse(error=error.message).model_dump()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers())


def _parse(model: type[ModelT], raw: bytes) -> ModelT:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = f"{where}: {error['msg']}" if where else error["msg"]
        raise BadRequestError(f"invalid request body: {message}", param=where or None) from None


async def _read_infer(request: Request) -> tuple[InferRequest, bytes]:
    """JSON header and trailing binary tensor data (Triton's binary tensor data extension)."""
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is None:
        return _parse(InferRequest, body), b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequestError(f"{HEADER_LENGTH} {header_length!r} is not a length within the "
                              f"{len(body)}-byte body", param=HEADER_LENGTH)
    split = int(header_length)
    return _parse(InferRequest, body[:split]), body[split:]


# -- health and metadata ---------------------------------------------------------------------

@router.get("/v2/health/live")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def server_ready(request: Request) -> Response:
    return Response(status_code=200 if request.app.state.server.is_ready else 400)


@router.get("/v2")
async def server_metadata(request: Request) -> Response:
    return JSONResponse(_handler(request).server_metadata().model_dump())


@router.get(MODEL)
@router.get(VERSIONED_MODEL)
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    try:
        metadata = _handler(request).model_metadata(name, version)
    except Exception as exc:
        return _error_response(exc, request)
    return JSONResponse(metadata.model_dump())


@router.get(MODEL + "/ready")
@router.get(VERSIONED_MODEL + "/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    try:
        _handler(request).check_model(name, version)
    except Exception as exc:
        return _error_response(exc, request)
    return Response(status_code=200 if request.app.state.server.is_ready else 400)


# -- inference -------------------------------------------------------------------------------

@router.post(MODEL + "/infer")
@router.post(VERSIONED_MODEL + "/infer")
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    try:
        infer_request, binary_data = await _read_infer(request)
        handler = _generation_handler(request)
        result = await until_disconnect(
            request.receive, handler.infer(name, version, infer_request, binary_data))
    except Exception as exc:
        return _error_response(exc, request)
    header = result.response.model_dump_json(exclude_none=True).encode()
    if not result.binary_data:
        return Response(header, media_type="application/json")
    return Response(header + result.binary_data, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


@router.post(MODEL + "/generate")
@router.post(VERSIONED_MODEL + "/generate")
async def generate(request: Request, name: str, version: str | None = None) -> Response:
    try:
        body = _parse(TritonGenerateRequest, await request.body())
        response = await until_disconnect(
            request.receive, _generation_handler(request).generate(name, version, body))
    except Exception as exc:
        return _error_response(exc, request)
    return Response(response.model_dump_json(exclude_unset=True),
                    media_type="application/json")


@router.post(MODEL + "/generate_stream")
@router.post(VERSIONED_MODEL + "/generate_stream")
async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
    """A request that fails before generation starts gets a JSON error with its status;
    a later failure ends the stream with a `data: {"error": ...}` event."""
    try:
        body = _parse(TritonGenerateRequest, await request.body())
        frames = await until_disconnect(request.receive, _generation_handler(request)
                                        .generate_stream(name, version, body,
                                                         request_id=_request_id(request)))
    except Exception as exc:
        return _error_response(exc, request)
    return event_stream(frames)
