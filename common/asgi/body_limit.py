"""Body size: a request over `max_body_bytes` gets 413 in OpenAI's error shape, whether
its `content-length` says so up front or a chunked body runs over while being read."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.asgi.request_id import request_id_var
from common.errors import RequestTooLargeError, send_api_error


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = RequestTooLargeError(self.max_body_bytes)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await send_api_error(send, error, request_id_var.get())
            return
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["too_large"] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message: Message) -> None:
            if state["too_large"]:  # a chunked body ran over: answer 413, drop the app's reply
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await send_api_error(send, error, request_id_var.get())
                return
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
