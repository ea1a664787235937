"""Request ids: `x-request-id` echoed when the client sends a sane one, else minted; set in
`request_id_var` for handlers and logs (`RequestIdLogFilter`), and sent on every response.
As the outermost middleware it is also the last line of defence: an exception nobody
handled becomes a logged 500 in OpenAI's shape that carries the request id, and a request
cancelled by the server's shutdown (the grace period ran out) a 503
`server_shutting_down` — never uvicorn's plain-text 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextvars import ContextVar

from opentelemetry import trace
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import (
    REQUEST_ID_HEADER,
    InternalServerError,
    ShuttingDownError,
    send_api_error,
)

logger = logging.getLogger(__name__)
request_id_var: ContextVar[str | None] = ContextVar("quiver_request_id", default=None)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` (or "-"), and the current span's `trace_id` / `span_id` ("" when no
    span is recording), to every log record, for formats that show them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        else:
            record.trace_id = record.span_id = ""
        record.log_ids = (f"{record.request_id} trace={record.trace_id}" if record.trace_id
                          else record.request_id)
        return True


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)

        started = finished = False

        async def send_with_id(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # Only the server cancels a request's task: its shutdown grace period is over.
            if started and not finished:
                raise  # a half-sent answer: uvicorn closes the connection
            if not started:
                logger.warning("request %s cut off by the shutdown", request_id)
                await send_api_error(send, ShuttingDownError(), request_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if started:
                raise
            await send_api_error(send, InternalServerError(request_id), request_id)
        finally:
            request_id_var.reset(token)
