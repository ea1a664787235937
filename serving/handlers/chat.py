"""`/v1/chat/completions`: chat template -> engine -> `chat.completion` or its chunks.

`ChatHandler.create` returns a `ChatCompletionResponse`, or for `stream: true` an async
iterator of SSE frames whose first engine output has already arrived (so admission errors
raise before any header is sent). A stream opens with one `{"role": "assistant"}` chunk per
choice; the rest is `OpenAIFormat`'s.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from serving.backends.base import GenerationRequest
from serving.errors import BadRequestError
from serving.handlers.context import HandlerContext
from serving.handlers.openai_format import OpenAIFormat, respond
from serving.handlers.output import ChoiceDelta, OutputProcessor, TextOutputProcessor, TokenLogprob
from serving.handlers.run import ChoiceResult, TextRun
from serving.handlers.sampling import OutputOptions, chat_settings
from serving.protocol.openai import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=lp.bytes, top_logprobs=[
            TopLogprob(token=token, logprob=value, bytes=raw) for token, value, raw in lp.top])
        for lp in logprobs])


class ChatFormat(OpenAIFormat):
    request: ChatCompletionRequest

    def opening(self) -> list[str]:
        return [self.frame([ChatCompletionStreamChoice(
            index=index, delta=DeltaMessage(role="assistant", content=""))])
            for index in range(self.request.n)]

    def content_choice(self, delta: ChoiceDelta) -> BaseModel:
        return ChatCompletionStreamChoice(index=delta.index, delta=DeltaMessage(content=delta.text),
                                          logprobs=chat_logprobs(delta.logprobs))

    def finish_choice(self, delta: ChoiceDelta) -> BaseModel:
        return ChatCompletionStreamChoice(index=delta.index, delta=DeltaMessage(),
                                          finish_reason=delta.finish_reason)

    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None) -> BaseModel:
        return ChatCompletionChunk(id=self.response_id, created=self.created,
                                   model=self.request.model, choices=choices, usage=usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> BaseModel:
        choices = [ChatCompletionChoice(
            index=result.index, message=AssistantMessage(content=result.text),
            logprobs=chat_logprobs(result.logprobs) if self.request.logprobs else None,
            finish_reason=result.finish_reason) for result in results]
        return ChatCompletionResponse(id=self.response_id, created=self.created,
                                      model=self.request.model, choices=choices, usage=usage)


class ChatHandler:
    def __init__(self, context: HandlerContext) -> None:
        self.context = context

    async def create(self, request: ChatCompletionRequest, *, request_id: str,
                     trace_headers: dict[str, str] | None = None
                     ) -> BaseModel | AsyncIterator[str]:
        self.context.check_model(request.model)
        settings = chat_settings(request)
        generation = GenerationRequest(f"chatcmpl-{uuid.uuid4().hex}", self._render(request),
                                       settings.params, settings.response_format,
                                       dict(trace_headers or {}))
        processor = self.output_processor(generation, settings.options)
        run = await TextRun.start(self.context.engine, [generation], [processor])
        fmt = ChatFormat(generation.request_id, int(time.time()), request, request_id)
        return await respond(run, fmt, is_stream=request.stream)

    def output_processor(self, generation: GenerationRequest,
                         options: OutputOptions) -> OutputProcessor:
        """What the choices' tokens become: text (a tool-call parser would wrap this)."""
        return TextOutputProcessor(self.context, generation, 0, options)

    def _render(self, request: ChatCompletionRequest) -> list[int]:
        tokenizer = self.context.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequestError("this model has no chat template; use /v1/completions",
                                  param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # jinja's TemplateError, raise_exception() in templates
            raise BadRequestError(f"the chat template rejected the messages: {exc}",
                                  param="messages") from exc
        return tokenizer.encode(text, add_special_tokens=False)
