"""`/v1/chat/completions`: chat template -> engine -> `chat.completion` or its chunks.

`ChatHandler.create` returns a `ChatCompletionResponse`, or for `stream: true` an async
iterator of SSE frames whose first engine output has already arrived (so admission errors
raise before any header is sent). A stream opens with one `{"role": "assistant"}` chunk per
choice; the rest is `OpenAIFormat`'s.

Tools: with `tools` and a `tool_choice` other than `none`, the tools go into the chat
template (or Quiver's default tool prompt where the template has no tool support), each
choice's text is parsed in the model's tool-call format (`--tool-call-parser`), and
`required` or a named function is enforced by constrained decoding. `tool_choice: none`
leaves the tools out of the prompt, so the model answers in prose.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from serving.backends.base import GenerationRequest
from serving.errors import BadRequestError
from serving.handlers.context import HandlerContext
from serving.handlers.openai_format import OpenAIFormat, respond
from serving.handlers.output import ChoiceDelta, OutputProcessor, TextOutputProcessor, TokenLogprob
from serving.handlers.prompt import render_chat
from serving.handlers.run import ChoiceResult, TextRun
from serving.handlers.sampling import OutputOptions, chat_settings
from serving.handlers.tool_output import ToolCallOutputProcessor
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
from serving.protocol.tools import DeltaFunction, DeltaToolCall, ToolCallFunction, ToolCallOut
from serving.structured.spec import GuideSpec
from serving.tools import ToolCallDelta, ToolChoice, template_inputs, tool_guide


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=lp.bytes, top_logprobs=[
            TopLogprob(token=token, logprob=value, bytes=raw) for token, value, raw in lp.top])
        for lp in logprobs])


def delta_tool_calls(calls: list[ToolCallDelta] | None) -> list[DeltaToolCall] | None:
    if not calls:
        return None
    return [DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                          function=DeltaFunction(name=call.name, arguments=call.arguments))
            for call in calls]


def assistant_message(result: ChoiceResult) -> AssistantMessage:
    """The message of a whole choice; a call cut off by `max_tokens` (its arguments not yet
    a JSON object) is left out."""
    calls = [ToolCallOut(id=call.id or "", function=ToolCallFunction(
        name=call.name or "", arguments=call.arguments))
        for call in result.tool_calls if is_json_object(call.arguments)]
    if not calls:
        return AssistantMessage(content=result.text)
    return AssistantMessage(content=result.text or None, tool_calls=calls)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class ChatFormat(OpenAIFormat):
    request: ChatCompletionRequest

    def opening(self) -> list[str]:
        return [self.frame([ChatCompletionStreamChoice(
            index=index, delta=DeltaMessage(role="assistant", content=""))])
            for index in range(self.request.n)]

    def content_choice(self, delta: ChoiceDelta) -> BaseModel:
        message = DeltaMessage(content=delta.text or (None if delta.tool_calls else ""),
                               tool_calls=delta_tool_calls(delta.tool_calls))
        return ChatCompletionStreamChoice(index=delta.index, delta=message,
                                          logprobs=chat_logprobs(delta.logprobs))

    def finish_choice(self, delta: ChoiceDelta) -> BaseModel:
        return ChatCompletionStreamChoice(index=delta.index, delta=DeltaMessage(),
                                          finish_reason=delta.finish_reason)

    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None) -> BaseModel:
        return ChatCompletionChunk(id=self.response_id, created=self.created,
                                   model=self.request.model, choices=choices, usage=usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> BaseModel:
        choices = [ChatCompletionChoice(
            index=result.index, message=assistant_message(result),
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
        self.context.limits.check_chat(request)
        tools = self._tools(request)
        settings = chat_settings(request, vocab_size=self.context.vocab_size,
                                 tool_guide=self._tool_guide(request, tools))
        generation = GenerationRequest(f"chatcmpl-{uuid.uuid4().hex}",
                                       self._render(request, tools), settings.params,
                                       dict(trace_headers or {}))
        processor = self.output_processor(generation, settings.options, has_tools=bool(tools))
        run = await TextRun.start(self.context.engine, [generation], [processor])
        fmt = ChatFormat(generation.request_id, int(time.time()), request, request_id)
        return await respond(run, fmt, is_stream=request.stream)

    def output_processor(self, generation: GenerationRequest, options: OutputOptions, *,
                         has_tools: bool = False) -> OutputProcessor:
        """What the choices' tokens become: text, split into content and tool calls when
        the request has tools."""
        if not has_tools:
            return TextOutputProcessor(self.context, generation, 0, options)
        fmt = self.context.tool_format
        if fmt.needs_special_tokens:  # its start marker is a special token
            options = OutputOptions(options.stop, False, options.want_logprobs)
        return ToolCallOutputProcessor(TextOutputProcessor(self.context, generation, 0, options),
                                       fmt)

    def _tools(self, request: ChatCompletionRequest) -> list[dict]:
        """The tools the model may call ([] for none, or `tool_choice: none`)."""
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
        choice = ToolChoice.of(request.tool_choice, has_tools=bool(tools))
        if choice.mode != "none" and not tools:
            raise BadRequestError("tool_choice needs tools to choose from", param="tool_choice")
        if choice.function is not None and choice.function not in {
                tool["function"]["name"] for tool in tools}:
            raise BadRequestError(f"tool_choice names function {choice.function!r}, which is "
                                  "not among the tools", param="tool_choice")
        return [] if choice.mode == "none" else tools

    def _tool_guide(self, request: ChatCompletionRequest, tools: list[dict]) -> GuideSpec | None:
        if not tools:
            return None
        choice = ToolChoice.of(request.tool_choice, has_tools=True)
        return tool_guide(self.context.tool_format, tools, choice,
                          parallel=request.parallel_tool_calls)

    def _render(self, request: ChatCompletionRequest, tools: list[dict]) -> list[int]:
        tokenizer = self.context.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequestError("this model has no chat template; use /v1/completions",
                                  param="messages")
        messages, extra = template_inputs(
            [message.as_template_message() for message in request.messages], tools,
            supports_tools=self.context.template_supports_tools)
        try:
            return render_chat(tokenizer, messages, **extra)
        except Exception as exc:  # jinja's TemplateError, raise_exception() in templates
            raise BadRequestError(f"the chat template rejected the messages: {exc}",
                                  param="messages") from exc
