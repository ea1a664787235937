"""Reads and parses a model call's JSON body once, for every later layer.

Model calls (POST /v1/chat/completions, /v1/completions, /v1/embeddings) must carry a JSON
object with a string `model` (a boolean `stream` and an object `stream_options` when
present, and for embeddings an `input`: the gateway acts on those); anything else is a 400
in OpenAI's shape. So is a body no model server should be handed: nested deeper than
`MAX_JSON_DEPTH` (Python's parser would hit its recursion limit and answer 500 with a
traceback), or holding a lone UTF-16 surrogate (`"\\ud800"`: valid JSON escapes, but no
text; model servers fail on it with a 500 that would count against the variant).
Everything else is the model server's to validate. The body is replayed to the app
unchanged, and later `receive` calls pass through (so a client disconnect is still seen).
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import send_api_error
from gateway.context import is_model_call, request_context
from gateway.errors import BadRequestError
from gateway.estimate import EMBEDDINGS_PATH

MAX_JSON_DEPTH = 64
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff, either case


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


def parse_model_call(raw: bytes, path: str = "/v1/chat/completions") -> dict[str, Any]:
    body = _parse_json(raw)
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
    if path == EMBEDDINGS_PATH:
        check_embeddings_input(body.get("input"))
    return body


def _parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except RecursionError as exc:
        raise too_deep() from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError("We could not parse the JSON body of your request: "
                              f"{exc}.") from exc
    # Brackets bound the depth: only a body with many of them is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep()
    if SURROGATE_ESCAPE.search(raw) and has_lone_surrogate(body):
        raise BadRequestError("The request body holds a lone UTF-16 surrogate (an unpaired "
                              "\\ud800-\\udfff escape), which is not text.",
                              code="invalid_unicode")
    return body


def too_deep() -> BadRequestError:
    return BadRequestError(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.",
                           code="json_too_deep")


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def check_embeddings_input(value: Any) -> None:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of
    token-id lists, never empty."""
    def is_ids(item: Any) -> bool:
        return (isinstance(item, list) and bool(item)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in item))

    is_valid = (isinstance(value, str) or is_ids(value)
                or (isinstance(value, list) and bool(value)
                    and (all(isinstance(item, str) for item in value)
                         or all(is_ids(item) for item in value))))
    if not is_valid:
        raise BadRequestError("`input` must be a string, a list of strings, a list of token "
                              "ids or a list of token-id lists, and not empty.", param="input",
                              code=None if value is not None else "missing_required_parameter")


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
            context.body = parse_model_call(context.raw_body, scope["path"])
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
