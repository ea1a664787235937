"""OpenAI routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Thin: validate (pydantic), call the handler, return JSON or an SSE stream. A client that
disconnects while a response is computed cancels the handler, which aborts the engine
request (streams: Starlette cancels the body iterator the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from common.asgi import trace_headers
from common.asgi.disconnect import ClientDisconnectedError, until_disconnect
from serving.api.state import ServerState
from serving.errors import InternalServerError, ServiceUnavailableError, from_exception
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
# What a response to a client that has already gone is counted as (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    info = state.engine.info
    return ModelList(data=[ModelCard(id=info.served_model_name, created=state.created,
                                     root=str(info.model_dir) if info.model_dir else None,
                                     max_model_len=info.max_model_len)])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state, request_id = _state(request), _request_id(request)
    return await _respond(request, state.chat.create(
        body, request_id=request_id, trace_headers=trace_headers()), prompt_param="messages")


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state, request_id = _state(request), _request_id(request)
    return await _respond(request, state.completions.create(
        body, request_id=request_id, trace_headers=trace_headers()), prompt_param="prompt")


async def _respond(request: Request, result: Awaitable[BaseModel | AsyncIterator[str]], *,
                   prompt_param: str) -> Response:
    request_id = _request_id(request)
    if _state(request).draining:
        result.close()  # type: ignore[attr-defined]
        raise ServiceUnavailableError("the server is shutting down", code="draining",
                                      retry_after_s=1)
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
    return DisconnectAwareStreamingResponse(value, media_type="text/event-stream",
                                            headers=STREAM_HEADERS)


class DisconnectAwareStreamingResponse(StreamingResponse):
    """Always watches for the client going away (Starlette only does below ASGI 2.4) and
    then cancels the body iterator, which aborts the engine request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError):
                await self.stream_response(send)

        streamer = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
        if streamer.done() and not streamer.cancelled() and streamer.exception():
            raise streamer.exception()  # type: ignore[misc]
