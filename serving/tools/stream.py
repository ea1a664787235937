"""Following a tool-call format as text streams in, as OpenAI streams tool calls.

`ToolCallStream.push(text)` takes the choice's text so far and returns what became final:
content before the calls (holding back anything that could still turn out to be the start
marker), then per call one `ToolCallDelta` with its id and name, then fragments of its
arguments. The arguments are the model's own JSON text, which only grows, so the fragments
concatenate to exactly what `ToolCallFormat.parse` returns for the finished text: the
official SDKs' stream helpers assemble the same calls a non-streamed answer holds.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from serving.tools.parsers import _NAME_THEN_ARGS, ToolCallFormat


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # with the name, on a call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class _CallProgress:
    id: str
    sent_arguments: int = 0


class ToolCallStream:
    def __init__(self, fmt: ToolCallFormat, *, implicit_start: str | None = None) -> None:
        """`implicit_start`: text that also opens the calls without the marker (llama3
        answers may begin with `{"name"` directly)."""
        self.format = fmt
        self.implicit_start = implicit_start
        self.sent_content = 0
        self.calls_at: int | None = None  # where the start marker begins
        self.calls: list[_CallProgress] = []

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    def push(self, text: str, *, is_final: bool = False) -> StreamDelta:
        delta = StreamDelta()
        if self.calls_at is None:
            self.calls_at = self._find_start(text)
            limit = len(text) if is_final else self._safe_content_end(text)
            end = limit if self.calls_at is None else self.calls_at
            if end > self.sent_content:
                delta.content = text[self.sent_content:end]
                self.sent_content = end
            if self.calls_at is None:
                return delta
        delta.tool_calls = self._call_deltas(text[self.calls_at:])
        return delta

    def _find_start(self, text: str) -> int | None:
        index = text.find(self.format.start)
        if index >= 0:
            return index
        if self.implicit_start and text.lstrip().startswith(self.implicit_start):
            return len(text) - len(text.lstrip())
        return None

    def _safe_content_end(self, text: str) -> int:
        """Content may go out up to where a start marker could still begin."""
        stripped = text.lstrip()
        if self.implicit_start and self.implicit_start.startswith(stripped):
            return self.sent_content  # the answer may still open with a call
        marker = self.format.start
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                return len(text) - size
        return len(text)

    def _call_deltas(self, text: str) -> list[ToolCallDelta]:
        if self.implicit_start and not text.startswith(self.format.start):
            text = self.format.start + text
        deltas = []
        decoder = json.JSONDecoder()
        for index, (begin, _) in enumerate(self.format.call_regions(text)):
            begin += len(text[begin:]) - len(text[begin:].lstrip())
            match = _NAME_THEN_ARGS.match(text, begin)
            if match is None:
                break  # the name is not complete yet (or not first: sent at the end)
            if index == len(self.calls):
                self.calls.append(_CallProgress(new_call_id()))
                deltas.append(ToolCallDelta(index, self.calls[index].id,
                                            json.loads(f'"{match.group(1)}"')))
            try:
                _, args_end = decoder.raw_decode(text, match.end())
            except ValueError:
                args_end = len(text)  # still inside the arguments: all of it is theirs
            arguments = text[match.end():args_end]
            progress = self.calls[index]
            if len(arguments) > progress.sent_arguments:
                fragment = arguments[progress.sent_arguments:]
                progress.sent_arguments = len(arguments)
                if deltas and deltas[-1].index == index:
                    deltas[-1].arguments += fragment
                else:
                    deltas.append(ToolCallDelta(index, arguments=fragment))
        return deltas
