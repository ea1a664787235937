"""Reads and parses a model call's JSON body once, for every later layer.

Model calls (POST /v1/chat/completions, /v1/completions) must carry a JSON object with a
string `model` (and a boolean `stream`, an object `stream_options`, when present: the
gateway acts on those); anything else is a 400 in OpenAI's shape. Everything else is the
model server's to validate. The body is replayed to the app
unchanged, and later `receive` calls pass through (so a client disconnect is still seen).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import send_api_error
from gateway.context import is_model_call, request_context
from gateway.errors import BadRequestError


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def parse_model_call(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError("We could not parse the JSON body of your request: "
                              f"{exc}.") from exc
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("You must provide a model parameter (a string).", param="model",
                              code="missing_required_parameter" if model is None else None)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequestError("`stream` must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequestError("`stream_options` must be an object.", param="stream_options")
    return body


class BodyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_model_call(scope):
            await self.app(scope, receive, send)
            return
        context = request_context(scope)
        context.raw_body = await read_body(receive)
        try:
            context.body = parse_model_call(context.raw_body)
        except BadRequestError as error:
            await send_api_error(send, error)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": context.raw_body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
