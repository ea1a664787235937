"""The base errors: `QuiverError` for the command line, `ApiError` for HTTP answers.

- `QuiverError`: every error a `quiver` command reports to the user as one clear line
  (each stage subclasses it).
- OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`, `code` a string
  or null. Every error response of the model server and the gateway has this shape.
  `ApiError` is the base of both servers' error hierarchies (`serving.errors`,
  `gateway.errors`): an exception that knows its HTTP status, headers and OpenAI body, and
  `send_api_error` writes one straight onto an ASGI `send`. The errors the shared
  middlewares answer with (413, the last-resort 500, and the 503 of a request the
  shutdown's grace period cut off) are defined here.
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.types import Send

REQUEST_ID_HEADER = b"x-request-id"


class QuiverError(Exception):
    """Base class: the message is shown to the user as it is, without a traceback."""

    exit_code = 1


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

    @classmethod
    def of(cls, message: str, type: str, *, param: str | None = None,
           code: str | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


class ApiError(Exception):
    """An error with its HTTP status and OpenAI body; subclasses set the class attributes."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def to_response(self) -> ErrorResponse:
        return ErrorResponse.of(self.message, self.error_type, param=self.param,
                                code=self.code)

    def body(self) -> bytes:
        return self.to_response().model_dump_json().encode()


class RequestTooLargeError(ApiError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than this server's limit of {limit} "
                         "bytes.")


class InternalServerError(ApiError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"The server had an error while processing your request "
                         f"(request id {request_id}); it has been logged.")


class ShuttingDownError(ApiError):
    status_code = 503
    error_type = "service_unavailable"
    code = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("The server is shutting down and stopped this request before it "
                         "finished; retry it.")

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1", "connection": "close"}


async def send_api_error(send: Send, error: ApiError, request_id: str | None = None,
                         extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete error response in OpenAI's shape, straight onto the ASGI `send`."""
    body = error.body()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error.headers().items()]
    headers += extra_headers or []
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
