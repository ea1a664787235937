"""The output side of chat with tools: each choice's text through its tool-call format.

`ToolCallOutputProcessor` wraps the `TextOutputProcessor` (detokenizing, stop strings,
logprobs and counts stay there) and splits every choice's text as it grows into content
and tool-call fragments (`serving.tools.ToolCallStream`): streamed, they go out as OpenAI's
tool-call deltas; collected, they assemble into `message.tool_calls`. A choice that
ends normally with at least one call finishes with `tool_calls`, as OpenAI's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.engine.outputs import RequestOutput
from serving.handlers.output import ChoiceDelta, TextOutputProcessor
from serving.tools import ToolCallFormat, ToolCallStream
from serving.tools.parsers import Llama3JsonFormat


@dataclass
class ToolCallOutputProcessor:
    inner: TextOutputProcessor
    format: ToolCallFormat
    _texts: dict[int, str] = field(default_factory=dict)
    _streams: dict[int, ToolCallStream] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.inner.request_id

    @property
    def first_index(self) -> int:
        return self.inner.first_index

    @property
    def num_choices(self) -> int:
        return self.inner.num_choices

    @property
    def is_finished(self) -> bool:
        return self.inner.is_finished

    @property
    def num_prompt_tokens(self) -> int:
        return self.inner.num_prompt_tokens

    @property
    def num_cached_tokens(self) -> int:
        return self.inner.num_cached_tokens

    @property
    def num_completion_tokens(self) -> int:
        return self.inner.num_completion_tokens

    def process(self, output: RequestOutput) -> list[ChoiceDelta]:
        return [self._split(delta) for delta in self.inner.process(output)]

    def finish(self) -> list[ChoiceDelta]:
        return [self._split(delta) for delta in self.inner.finish()]

    def _split(self, delta: ChoiceDelta) -> ChoiceDelta:
        stream = self._streams.get(delta.index)
        if stream is None:
            implicit = '{"name"' if isinstance(self.format, Llama3JsonFormat) else None
            stream = self._streams[delta.index] = ToolCallStream(self.format,
                                                                 implicit_start=implicit)
        text = self._texts[delta.index] = self._texts.get(delta.index, "") + delta.text
        split = stream.push(text, is_final=delta.finish_reason is not None)
        delta.text = split.content
        delta.tool_calls = split.tool_calls or None
        if delta.finish_reason == "stop" and stream.has_calls:
            delta.finish_reason = "tool_calls"
        return delta
