"""`/v1/completions`: prompt(s) -> engine -> `text_completion` or its chunks.

A prompt is a string, a list of strings, a list of token ids or a list of such lists; each
prompt is one engine request with `n` choices, and choice `i` of prompt `p` has index
`p * n + i`, as OpenAI numbers them. `echo` prepends the prompt's text. Streaming and
error behaviour are as in `serving.handlers.chat`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.backends.base import GenerationRequest
from serving.engine.errors import EngineError
from serving.errors import BadRequestError, from_exception
from serving.handlers import HandlerContext
from serving.handlers.sampling import completion_sampling_params
from serving.handlers.streaming import (
    SSE_DONE,
    ChoiceDelta,
    OutputProcessor,
    error_event,
    open_streams,
    sse_event,
    usage_of,
)
from serving.protocol.openai import (
    MAX_PROMPTS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)


@dataclass(frozen=True)
class _Prompt:
    token_ids: list[int]
    text: str


@dataclass
class _Run:
    response_id: str
    created: int
    request: CompletionRequest
    prompts: list[_Prompt]
    processors: list[OutputProcessor]
    request_id: str

    @property
    def include_usage(self) -> bool:
        return bool(self.request.stream_options and self.request.stream_options.include_usage)

    def response(self, choices: list[CompletionChoice], *, usage=None) -> CompletionResponse:
        return CompletionResponse(id=self.response_id, created=self.created,
                                  model=self.request.model, choices=choices, usage=usage)

    def chunk(self, choices: list[CompletionChoice]) -> str:
        return sse_event(self.response(choices),
                         exclude=None if self.include_usage else {"usage"})

    def echo_text(self, index: int) -> str:
        return self.prompts[index // self.request.n].text if self.request.echo else ""

    @property
    def is_finished(self) -> bool:
        return all(processor.is_finished for processor in self.processors)


def completion_logprobs(deltas: list[ChoiceDelta], offset: int) -> CompletionLogprobs:
    logprobs = CompletionLogprobs()
    for delta in deltas:
        for lp in delta.logprobs or []:
            logprobs.tokens.append(lp.token)
            logprobs.token_logprobs.append(lp.logprob)
            logprobs.top_logprobs.append({token: value for token, value, _ in lp.top})
            logprobs.text_offset.append(offset + lp.text_offset)
    return logprobs


class CompletionHandler:
    def __init__(self, context: HandlerContext) -> None:
        self.context = context

    async def create(self, request: CompletionRequest, *, request_id: str,
                     trace_headers: dict[str, str] | None = None
                     ) -> CompletionResponse | AsyncIterator[str]:
        self.context.check_model(request.model)
        params = completion_sampling_params(request)
        prompts = self._prompts(request)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        generations = [
            GenerationRequest(response_id if len(prompts) == 1 else f"{response_id}-{i}",
                              prompt.token_ids, params, None, dict(trace_headers or {}))
            for i, prompt in enumerate(prompts)]
        processors = [
            OutputProcessor(self.context, generation, i * request.n, request.stop_strings(),
                            request.skip_special_tokens, request.logprobs is not None)
            for i, generation in enumerate(generations)]
        run = _Run(response_id, int(time.time()), request, prompts, processors, request_id)
        try:
            outputs = await open_streams(self.context.engine, generations)
        except EngineError as exc:
            raise from_exception(exc, request_id=request_id) from exc
        if request.stream:
            return self._stream(run, outputs)
        return await self._collect(run, outputs)

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and isinstance(raw[0], int):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise BadRequestError("prompt must not be empty", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise BadRequestError(f"at most {MAX_PROMPTS} prompts per request, got "
                                  f"{len(items)}", param="prompt")
        prompts = []
        tokenizer = self.context.tokenizer
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(tokenizer.encode(item), item))
            else:
                self.context.check_token_ids(item, param="prompt")
                text = tokenizer.decode(item, skip_special_tokens=False) if request.echo else ""
                prompts.append(_Prompt(list(item), text))
        return prompts

    async def _collect(self, run: _Run, outputs) -> CompletionResponse:
        num_choices = len(run.prompts) * run.request.n
        texts = [run.echo_text(i) for i in range(num_choices)]
        deltas: list[list[ChoiceDelta]] = [[] for _ in range(num_choices)]
        finish_reasons: list[str | None] = [None] * num_choices
        async with contextlib.aclosing(outputs):
            async for prompt_index, output in outputs:
                for delta in run.processors[prompt_index].process(output):
                    texts[delta.index] += delta.text
                    deltas[delta.index].append(delta)
                    finish_reasons[delta.index] = delta.finish_reason
                if run.is_finished:
                    break
        choices = [
            CompletionChoice(
                index=i, text=texts[i], finish_reason=finish_reasons[i],
                logprobs=None if run.request.logprobs is None
                else completion_logprobs(deltas[i], len(run.echo_text(i))))
            for i in range(num_choices)]
        return run.response(choices, usage=usage_of(run.processors))

    async def _stream(self, run: _Run, outputs) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(outputs):
                if run.request.echo:
                    for i in range(len(run.prompts) * run.request.n):
                        yield run.chunk([CompletionChoice(index=i, text=run.echo_text(i))])
                async for prompt_index, output in outputs:
                    for delta in run.processors[prompt_index].process(output):
                        for frame in self._frames(run, delta):
                            yield frame
                    if run.is_finished:
                        break
            if run.include_usage:
                yield sse_event(run.response([], usage=usage_of(run.processors)))
        except Exception as exc:
            yield error_event(exc, run.request_id)
        yield SSE_DONE

    def _frames(self, run: _Run, delta: ChoiceDelta) -> list[str]:
        frames = []
        offset = len(run.echo_text(delta.index))
        if delta.text or delta.logprobs:
            logprobs = None
            if run.request.logprobs is not None:
                logprobs = completion_logprobs([delta], offset)
            frames.append(run.chunk([CompletionChoice(index=delta.index, text=delta.text,
                                                      logprobs=logprobs)]))
        if delta.finish_reason is not None:
            frames.append(run.chunk([CompletionChoice(index=delta.index, text="",
                                                      finish_reason=delta.finish_reason)]))
        return frames
