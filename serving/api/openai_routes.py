"""OpenAI routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Thin: validate (pydantic, off the event loop for large bodies: `serving.api.body`), call
the handler, return JSON or an SSE stream. A client that
disconnects while a response is computed cancels the handler, which aborts the engine
request (streams: `serving.api.responses.event_stream` cancels the frames the same way).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from common.asgi import trace_headers
from common.asgi.disconnect import ClientDisconnectedError, until_disconnect
from serving.api.body import read_model
from serving.api.responses import CLIENT_CLOSED_REQUEST, event_stream
from serving.api.state import ServerState
from serving.errors import InternalServerError, from_exception
from serving.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from serving.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger(__name__)
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    info = state.engine.info
    # root: the served name, never the server's directory layout
    return ModelList(data=[ModelCard(id=info.served_model_name, created=state.created,
                                     root=info.served_model_name,
                                     max_model_len=info.max_model_len,
                                     quiver=state.artifact.as_card())])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(request: Request) -> Response:
    return await _create(request, ChatCompletionRequest, "chat", prompt_param="messages")


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(request: Request) -> Response:
    return await _create(request, CompletionRequest, "completions", prompt_param="prompt")


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embedding(request: Request) -> Response:
    return await _create(request, EmbeddingRequest, "embeddings", prompt_param="input")


async def _create(request: Request, model: type[BaseModel], handler: str, *,
                  prompt_param: str) -> Response:
    """Parse the body as `model` and answer it with the state's `handler` (chat, ...)."""
    state = _state(request)
    state.check_accepting()
    body = await read_model(request, model)
    create = getattr(state, handler).create
    return await _respond(request, create(body, request_id=_request_id(request),
                                          trace_headers=trace_headers()),
                          prompt_param=prompt_param)


async def _respond(request: Request, result: Awaitable[BaseModel | AsyncIterator[str]], *,
                   prompt_param: str) -> Response:
    request_id = _request_id(request)
    try:
        value = await until_disconnect(request.receive, result)
    except ClientDisconnectedError:
        logger.info("client disconnected; request %s aborted", request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as exc:
        error = from_exception(exc, request_id=request_id, prompt_param=prompt_param)
        if isinstance(error, InternalServerError):
            logger.exception("request %s failed", request_id)
        raise error from exc
    if isinstance(value, BaseModel):
        return Response(value.model_dump_json(), media_type="application/json")
    return event_stream(value)
