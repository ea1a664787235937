"""Tools and tool messages into the chat template, and `tool_choice` into a constraint.

Templates that know tools (they use the `tools` variable, as transformers documents) get
the OpenAI function definitions as `tools=`, assistant turns with `tool_calls` (arguments as
a dict, as those templates expect) and `tool` turns as they are. A template without tool
support (SmolLM2's plain ChatML) gets Quiver's default instructions as a system prompt in
the format's own syntax, and earlier calls and results written out as text:

    <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>   (assistant turn)
    <tool_response>\\n...\\n</tool_response>                        (a user turn)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serving.structured.spec import GuideSpec
from serving.tools.parsers import ToolCallFormat

DEFAULT_TOOL_PROMPT = (
    "You can call functions to answer. Their signatures, as JSON schemas, are between "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with its name and arguments as a JSON object between "
    "<tool_call></tool_call> tags, one block per call:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>\n'
    "Use only the functions listed, and only values the conversation gives you. Function "
    "results come back between <tool_response></tool_response> tags.")


@dataclass(frozen=True)
class ToolChoice:
    """`tool_choice` resolved: `mode` none | auto | required; `function` for a named one."""

    mode: str
    function: str | None = None

    @classmethod
    def of(cls, value: Any, *, has_tools: bool) -> ToolChoice:
        if value is None:
            return cls("auto" if has_tools else "none")
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict):  # the protocol's NamedToolChoice
            value = value.model_dump()
        return cls("required", value["function"]["name"])


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def template_inputs(messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                    supports_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra template arguments for `apply_chat_template`."""
    if supports_tools:
        rendered = [_with_dict_arguments(message) for message in messages]
        return rendered, ({"tools": tools} if tools else {})
    rendered = [_as_text_turn(message) for message in messages]
    if tools:
        rendered = _with_tool_prompt(rendered, tools)
    return rendered, {}


def tool_guide(fmt: ToolCallFormat, tools: list[dict[str, Any]], choice: ToolChoice, *,
               parallel: bool) -> GuideSpec | None:
    """The constraint that forces a call (`required`: one or more, or exactly one without
    `parallel`; a named function: exactly one call of it); None else."""
    if choice.mode != "required":
        return None
    functions = [tool["function"] for tool in tools]
    if choice.function is not None:
        functions = [f for f in functions if f["name"] == choice.function]
        parallel = False
    return GuideSpec.structural_tag(fmt.structural_tag(functions, parallel=parallel),
                                    param="tool_choice")


def _with_dict_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call["function"])
        function["arguments"] = _arguments_dict(function.get("arguments"))
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}


def _as_text_turn(message: dict[str, Any]) -> dict[str, Any]:
    role = message["role"]
    if role == "tool":
        return {"role": "user",
                "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    if role == "assistant" and message.get("tool_calls"):
        blocks = [message["content"]] if message.get("content") else []
        for call in message["tool_calls"]:
            body = {"name": call["function"]["name"],
                    "arguments": _arguments_dict(call["function"].get("arguments"))}
            blocks.append(f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>")
        return {"role": "assistant", "content": "\n".join(blocks)}
    return {"role": role, "content": message.get("content") or ""}


def _with_tool_prompt(messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    signatures = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    prompt = DEFAULT_TOOL_PROMPT.format(tools=signatures)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"},
                *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _arguments_dict(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
