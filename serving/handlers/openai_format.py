"""What chat and completions share on the way out: one response / stream skeleton.

`respond(run, fmt, stream=...)` collects a run into the endpoint's response object, or
returns its SSE frames. `OpenAIFormat` frames a stream as OpenAI does: per choice a chunk
with its new text (and logprobs), then one with its `finish_reason`; a last chunk with
`usage` when `stream_options.include_usage` (otherwise chunks carry no `usage` key);
`data: [DONE]`. An error after the first frame is sent as a `data: {"error": ...}` event,
then `data: [DONE]`, which the OpenAI SDKs raise from. Subclasses say what their chunks
and responses look like.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from serving.errors import InternalServerError, from_exception
from serving.handlers.output import ChoiceDelta
from serving.handlers.run import SSE_DONE, ChoiceResult, TextRun, collect, sse_event, stream
from serving.protocol.openai import SamplingFields, UsageInfo

logger = logging.getLogger(__name__)


def error_event(exc: BaseException, request_id: str) -> str:
    """An error after streaming began, as the SSE event the OpenAI SDKs raise from."""
    error = from_exception(exc, request_id=request_id)
    if isinstance(error, InternalServerError):
        logger.error("request %s failed mid-stream", request_id, exc_info=exc)
    return sse_event(error.to_response())


@dataclass
class OpenAIFormat(ABC):
    response_id: str
    created: int
    request: SamplingFields
    request_id: str

    @property
    def include_usage(self) -> bool:
        return bool(self.request.stream_options and self.request.stream_options.include_usage)

    # -- what an endpoint's chunks and responses are ------------------------------------

    @abstractmethod
    def opening(self) -> list[str]: ...

    @abstractmethod
    def content_choice(self, delta: ChoiceDelta) -> BaseModel: ...

    @abstractmethod
    def finish_choice(self, delta: ChoiceDelta) -> BaseModel: ...

    @abstractmethod
    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None) -> BaseModel: ...

    @abstractmethod
    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> BaseModel: ...

    # -- the stream, framed the same for both -------------------------------------------

    def frame(self, choices: list[BaseModel]) -> str:
        return sse_event(self.chunk(choices), exclude=None if self.include_usage else {"usage"})

    def frames(self, delta: ChoiceDelta) -> list[str]:
        frames = []
        if delta.text or delta.logprobs or delta.tool_calls:
            frames.append(self.frame([self.content_choice(delta)]))
        if delta.finish_reason is not None:
            frames.append(self.frame([self.finish_choice(delta)]))
        return frames

    def closing(self, usage: UsageInfo) -> list[str]:
        if not self.include_usage:
            return [SSE_DONE]
        return [sse_event(self.chunk([], usage)), SSE_DONE]

    def error(self, exc: Exception) -> list[str]:
        return [error_event(exc, self.request_id), SSE_DONE]


async def respond(run: TextRun, fmt: OpenAIFormat, *,
                  is_stream: bool) -> BaseModel | AsyncIterator[str]:
    if is_stream:
        return stream(run, fmt)
    return fmt.response(await collect(run), run.usage())
