"""`/v1/completions`: prompt(s) -> engine -> `text_completion` or its chunks.

A prompt is a string, a list of strings, a list of token ids or a list of such lists; each
prompt is one engine request with `n` choices, and choice `i` of prompt `p` has index
`p * n + i`, as OpenAI numbers them. `echo` prepends the prompt's text (a stream opens with
one chunk of it per choice). Streaming and errors are as in `serving.handlers.chat`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from serving.backends.base import GenerationRequest
from serving.errors import BadRequestError
from serving.handlers.context import HandlerContext
from serving.handlers.openai_format import OpenAIFormat, respond
from serving.handlers.output import ChoiceDelta, OutputProcessor, TextOutputProcessor, TokenLogprob
from serving.handlers.run import ChoiceResult, TextRun
from serving.handlers.sampling import OutputOptions, completion_settings
from serving.protocol.openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for lp in logprobs:
        result.tokens.append(lp.token)
        result.token_logprobs.append(lp.logprob)
        result.top_logprobs.append({token: value for token, value, _ in lp.top})
        result.text_offset.append(offset + lp.text_offset)
    return result


@dataclass
class CompletionFormat(OpenAIFormat):
    request: CompletionRequest
    prompts: list[Prompt]

    def echo_text(self, index: int) -> str:
        return self.prompts[index // self.request.n].text if self.request.echo else ""

    def logprobs(self, index: int, logprobs: list[TokenLogprob] | None
                 ) -> CompletionLogprobs | None:
        if self.request.logprobs is None:
            return None
        return completion_logprobs(logprobs or [], len(self.echo_text(index)))

    def opening(self) -> list[str]:
        if not self.request.echo:
            return []
        return [self.frame([CompletionChoice(index=i, text=self.echo_text(i))])
                for i in range(len(self.prompts) * self.request.n)]

    def content_choice(self, delta: ChoiceDelta) -> BaseModel:
        return CompletionChoice(index=delta.index, text=delta.text,
                                logprobs=self.logprobs(delta.index, delta.logprobs))

    def finish_choice(self, delta: ChoiceDelta) -> BaseModel:
        return CompletionChoice(index=delta.index, text="", finish_reason=delta.finish_reason)

    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None) -> BaseModel:
        return CompletionResponse(id=self.response_id, created=self.created,
                                  model=self.request.model, choices=choices, usage=usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> BaseModel:
        return self.chunk([CompletionChoice(
            index=result.index, text=self.echo_text(result.index) + result.text,
            finish_reason=result.finish_reason,
            logprobs=self.logprobs(result.index, result.logprobs)) for result in results], usage)


class CompletionHandler:
    def __init__(self, context: HandlerContext) -> None:
        self.context = context

    async def create(self, request: CompletionRequest, *, request_id: str,
                     trace_headers: dict[str, str] | None = None
                     ) -> BaseModel | AsyncIterator[str]:
        self.context.check_model(request.model)
        settings = completion_settings(request, vocab_size=self.context.vocab_size)
        prompts = self._prompts(request)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        generations = [
            GenerationRequest(response_id if len(prompts) == 1 else f"{response_id}-{i}",
                              prompt.token_ids, settings.params, dict(trace_headers or {}))
            for i, prompt in enumerate(prompts)]
        processors = [self.output_processor(generation, i * request.n, settings.options)
                      for i, generation in enumerate(generations)]
        run = await TextRun.start(self.context.engine, generations, processors)
        fmt = CompletionFormat(response_id, int(time.time()), request, request_id, prompts)
        return await respond(run, fmt, is_stream=request.stream)

    def output_processor(self, generation: GenerationRequest, first_index: int,
                         options: OutputOptions) -> OutputProcessor:
        return TextOutputProcessor(self.context, generation, first_index, options)

    def _prompts(self, request: CompletionRequest) -> list[Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and isinstance(raw[0], int):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise BadRequestError("prompt must not be empty", param="prompt")
        self.context.limits.check_completion(request, len(items))
        prompts = []
        tokenizer = self.context.tokenizer
        for item in items:
            if isinstance(item, str):
                prompts.append(Prompt(tokenizer.encode(item), item))
            else:
                self.context.check_token_ids(item, param="prompt")
                text = tokenizer.decode(item, skip_special_tokens=False) if request.echo else ""
                prompts.append(Prompt(list(item), text))
        return prompts
