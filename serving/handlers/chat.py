"""`/v1/chat/completions`: chat template -> engine -> `chat.completion` or its chunks.

`ChatHandler.create` returns a `ChatCompletionResponse`, or for `stream: true` an async
iterator of SSE frames whose first engine output has already arrived (so admission errors
raise before any header is sent). An error after the first frame is sent as an SSE
`data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.backends.base import GenerationRequest, ResponseFormat
from serving.engine.errors import EngineError
from serving.errors import BadRequestError, from_exception
from serving.handlers import HandlerContext
from serving.handlers.sampling import chat_sampling_params
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
)


def chat_logprobs(delta: ChoiceDelta) -> ChatLogprobs | None:
    if delta.logprobs is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=lp.bytes, top_logprobs=[
            TopLogprob(token=token, logprob=value, bytes=raw) for token, value, raw in lp.top])
        for lp in delta.logprobs])


@dataclass
class _Run:
    response_id: str
    created: int
    request: ChatCompletionRequest
    processor: OutputProcessor
    request_id: str

    def chunk(self, choices: list[ChatCompletionStreamChoice]) -> str:
        chunk = ChatCompletionChunk(id=self.response_id, created=self.created,
                                    model=self.request.model, choices=choices)
        include_usage = bool(self.request.stream_options and
                             self.request.stream_options.include_usage)
        return sse_event(chunk, exclude=None if include_usage else {"usage"})


class ChatHandler:
    def __init__(self, context: HandlerContext) -> None:
        self.context = context

    async def create(self, request: ChatCompletionRequest, *, request_id: str,
                     trace_headers: dict[str, str] | None = None
                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.context.check_model(request.model)
        params = chat_sampling_params(request)
        response_format = None
        if request.response_format is not None:
            response_format = ResponseFormat(request.response_format.type,
                                             request.response_format.json_schema)
        generation = GenerationRequest(f"chatcmpl-{uuid.uuid4().hex}", self._render(request),
                                       params, response_format, dict(trace_headers or {}))
        processor = OutputProcessor(self.context, generation, 0, request.stop_strings(),
                                    request.skip_special_tokens, request.logprobs)
        run = _Run(generation.request_id, int(time.time()), request, processor, request_id)
        try:
            outputs = await open_streams(self.context.engine, [generation])
        except EngineError as exc:
            raise from_exception(exc, request_id=request_id, prompt_param="messages") from exc
        if request.stream:
            return self._stream(run, outputs)
        return await self._collect(run, outputs)

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

    async def _collect(self, run: _Run, outputs) -> ChatCompletionResponse:
        n = run.request.n
        texts = [""] * n
        logprobs: list[list] = [[] for _ in range(n)]
        async with contextlib.aclosing(outputs):
            async for _, output in outputs:
                for delta in run.processor.process(output):
                    texts[delta.index] += delta.text
                    if delta.logprobs:
                        logprobs[delta.index].append(delta)
                if run.processor.is_finished:
                    break
        choices = []
        for index, state in enumerate(run.processor.choices):
            merged = None
            if run.request.logprobs:
                merged = ChatLogprobs(content=[c for d in logprobs[index]
                                               for c in chat_logprobs(d).content or []])
            choices.append(ChatCompletionChoice(
                index=index, message=AssistantMessage(content=texts[index]), logprobs=merged,
                finish_reason=state.finish_reason))
        return ChatCompletionResponse(id=run.response_id, created=run.created,
                                      model=run.request.model, choices=choices,
                                      usage=usage_of([run.processor]))

    async def _stream(self, run: _Run, outputs) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(outputs):
                for index in range(run.request.n):
                    yield run.chunk([ChatCompletionStreamChoice(
                        index=index, delta=DeltaMessage(role="assistant", content=""))])
                async for _, output in outputs:
                    for delta in run.processor.process(output):
                        for frame in self._frames(run, delta):
                            yield frame
                    if run.processor.is_finished:
                        break
            if run.request.stream_options and run.request.stream_options.include_usage:
                usage_chunk = ChatCompletionChunk(
                    id=run.response_id, created=run.created, model=run.request.model,
                    choices=[], usage=usage_of([run.processor]))
                yield sse_event(usage_chunk)
        except Exception as exc:
            yield error_event(exc, run.request_id)
        yield SSE_DONE

    def _frames(self, run: _Run, delta: ChoiceDelta) -> list[str]:
        frames = []
        if delta.text or delta.logprobs:
            frames.append(run.chunk([ChatCompletionStreamChoice(
                index=delta.index, delta=DeltaMessage(content=delta.text),
                logprobs=chat_logprobs(delta))]))
        if delta.finish_reason is not None:
            frames.append(run.chunk([ChatCompletionStreamChoice(
                index=delta.index, delta=DeltaMessage(), finish_reason=delta.finish_reason)]))
        return frames
