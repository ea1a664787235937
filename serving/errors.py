"""The model server's errors, mapped once to an HTTP status and OpenAI's error body.

| error                      | status | type                   | code                    |
|----------------------------|--------|------------------------|-------------------------|
| BadRequestError            | 400    | invalid_request_error  | None or a specific code |
| ContextLengthError         | 400    | invalid_request_error  | context_length_exceeded |
| ModelNotFoundError         | 404    | invalid_request_error  | model_not_found         |
| RequestTooLargeError (*)   | 413    | invalid_request_error  | request_too_large       |
| TooManyRequestsError       | 429    | rate_limit_error       | rate_limit_exceeded     |
| InternalServerError (*)    | 500    | server_error           | internal_error          |
| ServiceUnavailableError    | 503    | service_unavailable    | queue_full, engine_dead |

(*) shared with the gateway, from `common.errors` (the shared middlewares answer with them).

`from_exception` turns engine errors (and anything unexpected) into one of these; handlers
and routers raise nothing else. Domain code never raises HTTP exceptions.
"""

from __future__ import annotations

import math

from common.errors import ApiError, InternalServerError, RequestTooLargeError
from serving.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)


class ServerError(ApiError):
    """Base of the model server's errors (status, type and code per subclass)."""


class BadRequestError(ServerError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ServerError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, served: str) -> None:
        super().__init__(f"The model `{model}` does not exist. This server serves `{served}`.",
                         param="model")


class NotFoundError(ServerError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class TooManyRequestsError(ServerError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(ServerError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


def from_exception(exc: BaseException, *, request_id: str,
                   prompt_param: str = "prompt") -> ApiError:
    """The one mapping of engine (and unexpected) errors to server errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ContextLengthError(str(exc), param=prompt_param)
    if isinstance(exc, InvalidRequestError):
        param = prompt_param if exc.param == "prompt" else exc.param
        return BadRequestError(str(exc), param=param)
    if isinstance(exc, QueueFullError):
        return ServiceUnavailableError(str(exc), code="queue_full",
                                       retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(str(exc), code="engine_dead")
    return InternalServerError(request_id)


__all__ = [
    "BadRequestError",
    "ContextLengthError",
    "InternalServerError",
    "ModelNotFoundError",
    "NotFoundError",
    "RequestTooLargeError",
    "ServerError",
    "ServiceUnavailableError",
    "TooManyRequestsError",
    "from_exception",
]
