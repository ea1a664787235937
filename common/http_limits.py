"""HTTP-level limits uvicorn's httptools protocol lacks, for both servers.

uvicorn bounds neither the size of a request's headers nor the time a client may take to
send them, and it never closes a connection that has not sent its first request: one
slow or silent client holds a socket and a slot for ever (slowloris). `limited_protocol`
returns uvicorn's `HttpToolsProtocol` with these limits, each answered in OpenAI's error
shape where an answer makes sense:

- `max_header_bytes`: the request line and headers together; past it -> 431
  `request_header_fields_too_large`, and the connection is closed.
- `header_timeout_s`: from a connection's start (or the end of its last response) until a
  request's headers are complete, at most this long; then the connection is closed (with
  a 408 when part of a request had arrived).
- `keep_alive_timeout_s`: an idle keep-alive connection is closed after this (uvicorn's
  own timer, made a float).
- `max_connections`: a request on a connection beyond it -> 503 `too_many_connections`
  with `Retry-After` and `Connection: close`.
- Shutdown: an idle keep-alive connection is not cut at once (a request already on its way
  would be dropped unanswered, and a POST cannot safely be retried): it lingers for
  `DRAIN_LINGER_S` (at most the grace period); a request arriving meanwhile is served and
  answered with `Connection: close`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DRAIN_LINGER_S = 1.0
HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    keep_alive_timeout_s: float
    max_connections: int
    backlog: int

    @classmethod
    def of(cls, settings: Any) -> HttpLimits:
        """From a settings object with the shared field names (`ServerSettings`,
        `GatewaySettings`)."""
        return cls(max_header_bytes=settings.max_header_bytes,
                   header_timeout_s=settings.header_timeout_seconds,
                   keep_alive_timeout_s=settings.keep_alive_timeout_seconds,
                   max_connections=settings.max_connections, backlog=settings.backlog)


def error_response(status: int, reason: str, message: str, code: str, *,
                   error_type: str = "invalid_request_error",
                   extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": code}}, separators=(",", ":")).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{name}: {value}" for name, value in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


TOO_MANY_CONNECTIONS = json.dumps({"error": {
    "message": "The server has too many open connections; retry shortly.",
    "type": "service_unavailable", "param": None, "code": "too_many_connections"}},
    separators=(",", ":")).encode()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's `HttpToolsProtocol` with `LIMITS` (set by `limited_protocol`)."""

    LIMITS: HttpLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.LIMITS.keep_alive_timeout_s
        self._wrapped_app = self.app
        self.app = self._admit
        self._is_awaiting_headers = True
        self._header_bytes = 0
        self._tail = b""
        self._header_timer: asyncio.TimerHandle | None = None
        self._is_draining = False

    # -- connection lifecycle ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._is_awaiting_headers and not self._count_header_bytes(data):
            return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._is_awaiting_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()
        if self._is_draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        starts_pipelined = bool(self.pipeline)  # its headers are in already
        super().on_response_complete()
        if not self.transport.is_closing() and not starts_pipelined:
            self._await_headers(start_timer=False)  # keep-alive's timer runs first

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        self._is_draining = True
        self._unset_keepalive_if_required()
        grace = self.config.timeout_graceful_shutdown
        linger = DRAIN_LINGER_S if grace is None else min(DRAIN_LINGER_S, grace)
        self.timeout_keep_alive_task = self.loop.call_later(
            linger, self.timeout_keep_alive_handler)

    # -- limits -----------------------------------------------------------------

    def _await_headers(self, *, start_timer: bool = True) -> None:
        self._is_awaiting_headers = True
        self._header_bytes = 0
        self._tail = b""
        if start_timer:
            self._start_header_timer()

    def _count_header_bytes(self, data: bytes) -> bool:
        """False (and the connection answered and closed) once headers run over."""
        if self._header_timer is None:  # the first byte after a keep-alive pause
            self._start_header_timer()
        window = self._tail + data
        end = window.find(HEADER_END)
        self._header_bytes += len(data) if end < 0 else end + len(HEADER_END) - len(
            self._tail)
        self._tail = window[-(len(HEADER_END) - 1):]
        if self._header_bytes <= self.LIMITS.max_header_bytes:
            return True
        self._reject(error_response(
            431, "Request Header Fields Too Large",
            f"The request's headers are larger than this server's limit of "
            f"{self.LIMITS.max_header_bytes} bytes.", "request_header_fields_too_large"))
        return False

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.LIMITS.header_timeout_s,
                                                  self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._is_awaiting_headers:
            return
        if self._header_bytes == 0:
            self.transport.close()
            return
        self._reject(error_response(
            408, "Request Timeout", "The request's headers did not arrive within "
            f"{self.LIMITS.header_timeout_s:g} s.", "request_timeout"))

    def _reject(self, answer: bytes) -> None:
        self._is_awaiting_headers = False
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    async def _admit(self, scope: Any, receive: Any, send: Any) -> None:
        if len(self.connections) <= self.LIMITS.max_connections:
            await self._wrapped_app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(TOO_MANY_CONNECTIONS)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": TOO_MANY_CONNECTIONS})


def limited_protocol(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class with `limits`, for `uvicorn.Config(http=...)`."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"LIMITS": limits})
