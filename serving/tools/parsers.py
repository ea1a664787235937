"""Tool-call formats, one per model family, with vLLM's names: `hermes`, `llama3_json`,
`mistral`.

A format knows three things:
- how a call looks in the model's text (`parse` finds every call in a finished answer;
  `ToolCallStream` follows it token by token);
- the structural tag that forces a call (`tool_choice: required` or a named function), so
  constrained decoding writes exactly that shape with arguments valid against the
  function's JSON schema;
- whether its markers are special tokens that must stay in the text (mistral's
  `[TOOL_CALLS]`).

Every call is a JSON object with the function's name first and its arguments after
(`{"name": ..., "arguments": {...}}`; llama3 says `parameters`). The arguments handed to
the client are the model's own JSON text for them, so streamed fragments and the
non-streamed answer agree byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from serving.structured.spec import normalize_schema

_NAME_THEN_ARGS = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as the model wrote it


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: list[ParsedCall]


def read_call(text: str, start: int = 0) -> tuple[ParsedCall, int] | None:
    """The call object starting at `text[start]` (after whitespace), and where it ends."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text[start:].lstrip())
    match = _NAME_THEN_ARGS.match(text, start)
    try:
        value, end = decoder.raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    if match is not None:  # the model's own text of the arguments
        _, args_end = decoder.raw_decode(text, match.end())
        raw = text[match.end():args_end]
    else:
        raw = json.dumps(arguments, ensure_ascii=False)
    return ParsedCall(value["name"], raw), end


class ToolCallFormat:
    """A model family's tool-call syntax (subclasses set the markers)."""

    name: ClassVar[str]
    start: ClassVar[str]  # what opens the tool calls in the model's text
    needs_special_tokens: ClassVar[bool] = False

    def parse(self, text: str) -> ParsedOutput:
        """Content before the first call and every call; no calls when any is malformed
        (then the whole text is content, as the model wrote it)."""
        index = text.find(self.start)
        if index < 0:
            return ParsedOutput(text, [])
        calls = self.parse_calls(text[index:])
        if not calls:
            return ParsedOutput(text, [])
        content = text[:index].strip()
        return ParsedOutput(content or None, calls)

    def parse_calls(self, text: str) -> list[ParsedCall]:
        raise NotImplementedError

    def call_regions(self, text: str) -> list[tuple[int, int | None]]:
        """Where each call object starts in `text` (which begins at the start marker) and
        where it ends (None while it is still being written): what streaming follows."""
        raise NotImplementedError

    def structural_tag(self, functions: list[dict[str, Any]], *, parallel: bool
                       ) -> dict[str, Any]:
        raise NotImplementedError


class HermesFormat(ToolCallFormat):
    """`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call
    (Hermes, Qwen2.5, and the default for templates without tool support)."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_calls(self, text: str) -> list[ParsedCall]:
        calls = []
        for begin, end in self.call_regions(text):
            if end is None:
                return []
            parsed = read_call(text, begin)
            if parsed is None:
                return []
            calls.append(parsed[0])
        return calls

    def call_regions(self, text: str) -> list[tuple[int, int | None]]:
        regions, position = [], 0
        while (begin := text.find(self.start, position)) >= 0:
            begin += len(self.start)
            close = text.find(self.end, begin)
            if close < 0:
                regions.append((begin, None))
                break
            regions.append((begin, close))
            position = close + len(self.end)
        return regions

    def structural_tag(self, functions: list[dict[str, Any]], *, parallel: bool
                       ) -> dict[str, Any]:
        tags = [{"type": "tag",
                 "begin": f'<tool_call>\n{{"name": {json.dumps(f["name"])}, "arguments": ',
                 "content": _json_content(f),
                 "end": "}\n</tool_call>"} for f in functions]
        return {"type": "structural_tag",
                "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                           "at_least_one": True, "stop_after_first": not parallel}}


class _JsonListFormat(ToolCallFormat):
    """Calls as JSON objects after a start marker, separated by `separator`."""

    separator: ClassVar[str]

    def parse_calls(self, text: str) -> list[ParsedCall]:
        calls = []
        for begin, end in self.call_regions(text):
            parsed = read_call(text, begin) if end is not None else None
            if parsed is None:
                return []
            calls.append(parsed[0])
        return calls

    def call_regions(self, text: str) -> list[tuple[int, int | None]]:
        regions, position = [], len(self.start)
        while True:
            begin = _skip(text, position, f" \n\t{self.separator}")
            if begin >= len(text) or text[begin] != "{":
                return regions
            parsed = read_call(text, begin)
            if parsed is None:
                regions.append((begin, None))
                return regions
            regions.append((begin, parsed[1]))
            position = parsed[1]


class Llama3JsonFormat(_JsonListFormat):
    """`<|python_tag|>{"name": "f", "parameters": {...}}; {...}` (Llama 3.1-3.3 JSON tool
    calls); the tag may be left out, then the answer starts with the object."""

    name = "llama3_json"
    start = "<|python_tag|>"
    separator = ";"

    def parse(self, text: str) -> ParsedOutput:
        if self.start not in text and text.lstrip().startswith('{"name"'):
            text = self.start + text.lstrip()
        return super().parse(text)

    def structural_tag(self, functions: list[dict[str, Any]], *, parallel: bool
                       ) -> dict[str, Any]:
        body = _object_calls(functions, "parameters", "; ", parallel=parallel)
        return {"type": "structural_tag",
                "format": {"type": "sequence",
                           "elements": [{"type": "const_string", "value": self.start}, body]}}


class MistralFormat(_JsonListFormat):
    """`[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]` (Mistral 7B v0.3 and later);
    `[TOOL_CALLS]` is a special token, so the text keeps special tokens."""

    name = "mistral"
    start = "[TOOL_CALLS]"
    separator = ","
    needs_special_tokens = True

    def call_regions(self, text: str) -> list[tuple[int, int | None]]:
        opened = _skip(text, len(self.start), " \n\t")
        if opened >= len(text) or text[opened] != "[":
            return []
        return super().call_regions(text[: opened] + " " + text[opened + 1:])

    def structural_tag(self, functions: list[dict[str, Any]], *, parallel: bool
                       ) -> dict[str, Any]:
        body = _object_calls(functions, "arguments", ", ", parallel=parallel)
        return {"type": "structural_tag",
                "format": {"type": "sequence", "elements": [
                    {"type": "const_string", "value": self.start + "["}, body,
                    {"type": "const_string", "value": "]"}]}}


FORMATS: dict[str, type[ToolCallFormat]] = {
    fmt.name: fmt for fmt in (HermesFormat, Llama3JsonFormat, MistralFormat)}


def format_named(name: str) -> ToolCallFormat:
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: "
                         f"{', '.join(sorted(FORMATS))}") from None


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The format a chat template writes tool calls in; hermes where it has none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralFormat()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonFormat()
    return HermesFormat()


def _object_calls(functions: list[dict[str, Any]], arguments_key: str, separator: str, *,
                  parallel: bool) -> dict[str, Any]:
    """One or more `{"name": ..., "<arguments_key>": {...}}` objects, separated."""
    tags = [{"type": "tag",
             "begin": f'{{"name": {json.dumps(f["name"])}, "{arguments_key}": ',
             "content": _json_content(f), "end": "}"} for f in functions]
    return {"type": "tags_with_separator", "tags": tags, "separator": separator,
            "at_least_one": True, "stop_after_first": not parallel}


def _json_content(function: dict[str, Any]) -> dict[str, Any]:
    """The arguments as JSON valid against the function's schema; at most one whitespace
    character in a row (small models otherwise pad a valid prefix with newlines)."""
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "json_schema", "json_schema": normalize_schema(schema),
            "max_whitespace_cnt": 1}


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position
