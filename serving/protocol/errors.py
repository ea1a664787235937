"""OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`, `code` a string
or null. Every error response of the model server and the gateway has this shape."""

from __future__ import annotations

from pydantic import BaseModel


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
