"""From engine outputs to per-choice text, and SSE framing.

- `open_streams(engine, requests)` admits every engine request and pulls each one's first
  output before returning, so admission errors (queue full, prompt too long) raise while
  the HTTP status can still say so; it returns one iterator of `(prompt_index, output)`
  merged over the requests. Closing it (or cancelling its consumer) aborts them all.
- `OutputProcessor` turns one engine request's `RequestOutput`s into `ChoiceDelta`s:
  incremental text (no broken UTF-8), stop strings cut exactly, EOS / stop-token text
  hidden but counted, logprobs with token strings.
- `sse_event(obj)` / `SSE_DONE`: `data: <json>\\n\\n` frames as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from serving.backends.base import EngineClient, GenerationRequest
from serving.engine.outputs import CompletionDelta, Logprobs, RequestOutput
from serving.errors import InternalServerError, from_exception
from serving.handlers import HandlerContext
from serving.handlers.detokenizer import IncrementalDetokenizer, StopChecker
from serving.handlers.tracing import record_engine_spans
from serving.protocol.openai import PromptTokensDetails, UsageInfo

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude)
    else:
        body = json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]
    text_offset: int


@dataclass
class ChoiceDelta:
    index: int
    text: str
    num_new_tokens: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class ChoiceState:
    """Detokenizer, stop checker and counters of one choice."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    want_logprobs: bool
    num_chars: int = 0
    num_tokens: int = 0
    finish_reason: str | None = None

    def update(self, delta: CompletionDelta, context: HandlerContext) -> ChoiceDelta | None:
        if self.finish_reason is not None:
            return None  # stopped on a stop string; the engine has not caught up yet
        out = ChoiceDelta(self.index, "", 0, [] if self.want_logprobs else None)
        # An engine stop (EOS or a stop token id) ends with that token: counted, not shown.
        num_shown = len(delta.new_token_ids) - (delta.finish_reason == "stop")
        for position, token_id in enumerate(delta.new_token_ids):
            out.num_new_tokens += 1
            if position >= num_shown:
                break
            if out.logprobs is not None and delta.logprobs:
                out.logprobs.append(self._logprob(token_id, delta.logprobs[position], context))
            self._append(out, self.stop.push(self.detokenizer.push([token_id])))
            if self.stop.stopped:
                self.finish_reason = "stop"
                break
        if self.finish_reason is None and delta.finish_reason is not None:
            self._append(out, self.stop.push(self.detokenizer.flush()))
            self._append(out, self.stop.flush())
            self.finish_reason = "stop" if self.stop.stopped else str(delta.finish_reason)
        self.num_tokens += out.num_new_tokens
        out.finish_reason = self.finish_reason
        return out

    def _append(self, out: ChoiceDelta, text: str) -> None:
        out.text += text
        self.num_chars += len(text)

    def _logprob(self, token_id: int, logprobs: Logprobs,
                 context: HandlerContext) -> TokenLogprob:
        def entry(tid: int, value: float) -> tuple[str, float, list[int]]:
            text, raw = context.token_text(tid)
            return text, value, raw

        token, value, raw = entry(token_id, logprobs.sampled_logprob)
        top = [entry(tid, lp) for tid, lp in logprobs.top_logprobs]
        return TokenLogprob(token, value, raw, top, self.num_chars)


@dataclass
class OutputProcessor:
    """All choices of one engine request (one prompt): `first_index` is choice 0's index."""

    context: HandlerContext
    request: GenerationRequest
    first_index: int
    stop: Sequence[str]
    skip_special_tokens: bool
    want_logprobs: bool
    choices: list[ChoiceState] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        for i in range(self.request.params.n):
            detokenizer = IncrementalDetokenizer(
                self.context.tokenizer, skip_special_tokens=self.skip_special_tokens,
                prompt_token_ids=self.request.prompt_token_ids)
            self.choices.append(ChoiceState(self.first_index + i, detokenizer,
                                            StopChecker(self.stop), self.want_logprobs))
        self.num_prompt_tokens = len(self.request.prompt_token_ids)

    def process(self, output: RequestOutput) -> list[ChoiceDelta]:
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens
        deltas = []
        for delta in output.deltas:
            choice_delta = self.choices[delta.index].update(delta, self.context)
            if choice_delta is not None:
                deltas.append(choice_delta)
        return deltas

    @property
    def is_finished(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.choices)

    @property
    def num_completion_tokens(self) -> int:
        return sum(choice.num_tokens for choice in self.choices)


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
    """Admit every request and pull its first output; then merge their outputs."""
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for request in requests:
            generator = engine.generate(request)
            streams.append(generator)
            first = await anext(generator, None)
            streams[-1] = _primed(first, generator)
    except BaseException:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        raise
    return merge(streams)


_DONE = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:  # type: ignore[type-var]
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, _DONE))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
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


def usage_of(processors: list[OutputProcessor]) -> UsageInfo:
    prompt = sum(p.num_prompt_tokens for p in processors)
    completion = sum(p.num_completion_tokens for p in processors)
    cached = sum(p.num_cached_tokens for p in processors)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def error_event(exc: BaseException, request_id: str) -> str:
    """An error after streaming began, as the SSE event the OpenAI SDKs raise from."""
    error = from_exception(exc, request_id=request_id)
    if isinstance(error, InternalServerError):
        logger.error("request %s failed mid-stream", request_id, exc_info=exc)
    return sse_event(error.to_response())
