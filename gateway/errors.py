"""The gateway's errors, mapped once to an HTTP status and OpenAI's error body.

| error                    | status | type                   | code                   |
|--------------------------|--------|------------------------|------------------------|
| BadRequestError          | 400    | invalid_request_error  | None or specific       |
| AuthenticationError      | 401    | invalid_request_error  | invalid_api_key        |
| PermissionDeniedError    | 403    | invalid_request_error  | model_not_allowed ...  |
| NotFoundError            | 404    | invalid_request_error  | model_not_found ...    |
| RateLimitError           | 429    | rate_limit_error       | rate_limit_exceeded    |
| QuotaExceededError       | 429    | insufficient_quota     | insufficient_quota     |
| ConcurrencyLimitError    | 429    | rate_limit_error       | concurrency_limit_exceeded |
| TenantQueueFullError     | 429    | rate_limit_error       | tenant_queue_full      |
| UpstreamError            | 502    | upstream_error         | bad_gateway            |
| NoUpstreamError          | 503    | service_unavailable    | no_healthy_upstream    |
| LimiterDownError         | 503    | service_unavailable    | rate_limiter_unavailable |
| SaturatedError           | 503    | service_unavailable    | upstreams_saturated    |
| UpstreamTimeoutError     | 504    | upstream_error         | upstream_timeout       |

Keys never appear in a message: only a key's name. A body over the limit gets the shared
`BodySizeLimitMiddleware`'s 413 (`request_too_large`), and an unexpected exception the
shared request-id middleware's 500, both in the same shape.
"""

from __future__ import annotations

import math

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from common.errors import ApiError


class GatewayError(ApiError):
    """Base of every error the gateway answers with."""


class BadRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="quiver"'}


class PermissionDeniedError(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"



class _RetryAfter(GatewayError):
    def __init__(self, message: str, *, retry_after_s: float | None = None,
                 code: str | None = None, extra_headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.extra_headers = extra_headers or {}

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class RateLimitError(_RetryAfter):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ConcurrencyLimitError(_RetryAfter):
    """The key's `max_concurrency` calls are in flight and its tenant's queue is full, or
    the call waited `queue_timeout_seconds` for one of them (`gateway.admission`)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "concurrency_limit_exceeded"


class TenantQueueFullError(_RetryAfter):
    """The upstreams are saturated and this tenant's queue holds `max_queue_per_tenant`."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "tenant_queue_full"


class QuotaExceededError(GatewayError):
    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    code = "bad_gateway"


class NoUpstreamError(_RetryAfter):
    status_code = 503
    error_type = "service_unavailable"
    code = "no_healthy_upstream"


class LimiterDownError(_RetryAfter):
    """The rate limiter's backend is unreachable and `failure_mode` is `fail_closed`."""

    status_code = 503
    error_type = "service_unavailable"
    code = "rate_limiter_unavailable"


class RouteStateDownError(_RetryAfter):
    """An admin change to routes while the shared route state (Redis) is unreachable."""

    status_code = 503
    error_type = "service_unavailable"
    code = "route_state_unavailable"


class SaturatedError(_RetryAfter):
    """The call waited `queue_timeout_seconds` for a free upstream slot (`gateway.admission`)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "upstreams_saturated"


class UpstreamTimeoutError(GatewayError):
    status_code = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    """A Starlette response for `error` (routers raise; the app's handler answers)."""
    return Response(error.body(), status_code=error.status_code,
                    headers={**error.headers(), **(headers or {})},
                    media_type="application/json")


async def handle_api_error(request: Request, exc: Exception) -> Response:
    """Exception handler the app installs for `ApiError` (FastAPI `add_exception_handler`)."""
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (no such route, wrong method), in OpenAI's shape."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        error: ApiError = MethodNotAllowedError(
            f"{request.method} is not allowed on {request.url.path}.")
    elif exc.status_code == 404:
        error = NotFoundError(f"Unknown endpoint {request.method} {request.url.path}.")
    else:
        error = GatewayError(str(exc.detail))
        error.status_code = exc.status_code
    return error_response(error, headers=dict(exc.headers or {}))
