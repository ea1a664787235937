"""The engine side of every text endpoint, and the one collect / stream skeleton.

- `TextRun.start(engine, generations, processors)` admits every engine request (one per
  prompt) and pulls each one's first output before returning, so admission errors (queue
  full, prompt too long) raise while the HTTP status can still say so.
- `TextRun.deltas()` feeds the merged outputs to their processors and yields every
  choice's deltas until every choice has finished. A choice that ends before the engine
  ends it (a stop string) is aborted in the engine at once (`EngineClient.abort_choice`),
  so it stops generating and frees its KV blocks while its siblings go on. Leaving early —
  or a cancelled task, when the client disconnects — closes the engine streams, which
  aborts whatever still runs.
- `collect(run)` -> one `ChoiceResult` per choice; `stream(run, fmt)` -> SSE frames in an
  endpoint's `StreamFormat`: its opening frames, frames per delta, closing frames (with
  usage), or its error frames for a failure once streaming has begun.
- `sse_event(payload)` / `SSE_DONE`: `data: <json>\\n\\n` frames as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from serving.backends.base import EngineClient, GenerationRequest
from serving.engine.outputs import RequestOutput
from serving.handlers.output import ChoiceDelta, OutputProcessor, TokenLogprob
from serving.handlers.tracing import record_engine_spans
from serving.protocol.openai import PromptTokensDetails, UsageInfo
from serving.tools import ToolCallDelta

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None,
              exclude_unset: bool = False) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude, exclude_unset=exclude_unset)
    else:
        body = json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"


@dataclass
class TextRun:
    """One endpoint call in flight: its engine requests (one per prompt), their output
    processors, and their outputs merged as `(prompt_index, output)`."""

    engine: EngineClient
    processors: list[OutputProcessor]
    outputs: AsyncIterator[tuple[int, RequestOutput]]

    @classmethod
    async def start(cls, engine: EngineClient, generations: Sequence[GenerationRequest],
                    processors: Sequence[OutputProcessor]) -> TextRun:
        assert len(generations) == len(processors), "one processor per engine request"
        return cls(engine, list(processors), await open_streams(engine, generations))

    @property
    def num_choices(self) -> int:
        return sum(processor.num_choices for processor in self.processors)

    @property
    def is_finished(self) -> bool:
        return all(processor.is_finished for processor in self.processors)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        async with contextlib.aclosing(self.outputs):
            async for prompt_index, output in self.outputs:
                processor = self.processors[prompt_index]
                deltas = processor.process(output)
                if not self.is_finished:  # else leaving aborts whatever still runs
                    await self._abort_ended(processor, deltas)
                for delta in deltas:
                    yield delta
                if self.is_finished:
                    return
        for processor in self.processors:  # the engine ended a request without a reason
            for delta in processor.finish():
                yield delta

    async def _abort_ended(self, processor: OutputProcessor,
                           deltas: list[ChoiceDelta]) -> None:
        for delta in deltas:
            if delta.ended_before_engine:
                await self.engine.abort_choice(processor.request_id,
                                               delta.index - processor.first_index)

    def usage(self) -> UsageInfo:
        prompt = sum(p.num_prompt_tokens for p in self.processors)
        completion = sum(p.num_completion_tokens for p in self.processors)
        cached = sum(p.num_cached_tokens for p in self.processors)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


# -- collect and stream ------------------------------------------------------------------

@dataclass
class ChoiceResult:
    """One choice of a run, whole; tool calls assembled from their fragments."""

    index: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.num_tokens += delta.num_new_tokens
        self.logprobs.extend(delta.logprobs or ())
        for call in delta.tool_calls or ():
            if call.index == len(self.tool_calls):
                self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name))
            self.tool_calls[call.index].arguments += call.arguments
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


async def collect(run: TextRun) -> list[ChoiceResult]:
    results = [ChoiceResult(index) for index in range(run.num_choices)]
    async with contextlib.aclosing(run.deltas()) as deltas:
        async for delta in deltas:
            results[delta.index].add(delta)
    return results


class StreamFormat(Protocol):
    """How an endpoint frames a streamed run."""

    def opening(self) -> list[str]: ...

    def frames(self, delta: ChoiceDelta) -> list[str]: ...

    def closing(self, usage: UsageInfo) -> list[str]: ...

    def error(self, exc: Exception) -> list[str]: ...


async def stream(run: TextRun, fmt: StreamFormat) -> AsyncIterator[str]:
    try:
        for frame in fmt.opening():
            yield frame
        async with contextlib.aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                for frame in fmt.frames(delta):
                    yield frame
        closing = fmt.closing(run.usage())
    except Exception as exc:
        closing = fmt.error(exc)
    for frame in closing:
        yield frame


# -- engine streams ----------------------------------------------------------------------

async def _primed(first: RequestOutput | None,
                  rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        if first is not None:
            _trace(first)
            yield first
        async for output in rest:
            _trace(output)
            yield output


def _trace(output: RequestOutput) -> None:
    if output.times is not None:
        record_engine_spans(output.times, request_id=output.request_id)


async def open_streams(engine: EngineClient, requests: Sequence[GenerationRequest]
                       ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Admit every request at once and wait for each one's first output; then merge their
    outputs. If any fails, every one is closed (which aborts it) and the error raised."""
    generators = [engine.generate(request) for request in requests]
    firsts = [asyncio.ensure_future(anext(generator, None)) for generator in generators]
    try:
        await asyncio.gather(*firsts)
    except BaseException:
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for generator in generators:
            await generator.aclose()  # type: ignore[attr-defined]
        raise
    return merge([_primed(first.result(), generator)
                  for first, generator in zip(firsts, generators, strict=True)])


_DONE = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, Any]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(source):  # type: ignore[type-var]
                async for item in source:
                    await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, _DONE))

    tasks = [asyncio.create_task(pump(i, source)) for i, source in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, status = await queue.get()
            if status is _DONE:
                remaining -= 1
            elif status is not None:
                raise status
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
