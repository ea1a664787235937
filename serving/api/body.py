"""Request bodies parsed and validated off the event loop's critical path.

A body is read whole (the body-size middleware has bounded it), then validated with
pydantic's own JSON parser: in place when small, in a worker thread when larger than
`INLINE_PARSE_BYTES`, so one big request never stalls `/health` or other streams.
pydantic's parser also refuses what Python's `json` lets through to fail later: a lone
UTF-16 surrogate (`"a\\ud800b"`) and nesting past its recursion limit are `json_invalid`,
a 400. Validation errors are raised as FastAPI's, so one handler words every 400.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

INLINE_PARSE_BYTES = 64 * 1024
ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_model(request: Request, model: type[ModelT]) -> ModelT:
    raw = await request.body()
    if len(raw) <= INLINE_PARSE_BYTES:
        return parse_model(model, raw)
    return await asyncio.to_thread(parse_model, model, raw)


def parse_model(model: type[ModelT], raw: bytes) -> ModelT:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])}
                  for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None
