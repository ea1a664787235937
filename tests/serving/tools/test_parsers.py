"""Tool-call formats: parsing finished answers, following streams, forcing calls."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from serving.structured import GuideCompiler, GuidedDecoding, GuideSpec
from serving.tools import ToolCallStream, ToolChoice, detect_format, format_named, tool_guide

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 6}}, "required": ["zone"],
        "additionalProperties": False}}}

ANSWERS = {
    "hermes": ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
               '"arguments": {"zone":"CET"}}\n</tool_call>'),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
                    '"unit": "celsius"}}; {"name": "get_time", "parameters": {"zone":"CET"}}'),
    "mistral": ('Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": '
                '"Paris", "unit": "celsius"}}, {"name": "get_time", "arguments": '
                '{"zone":"CET"}}]'),
}
EXPECTED_CALLS = [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                  ("get_time", '{"zone":"CET"}')]


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_a_finished_answer_parses_into_calls_with_the_models_argument_text(name):
    parsed = format_named(name).parse(ANSWERS[name])
    assert [(c.name, c.arguments) for c in parsed.calls] == EXPECTED_CALLS
    assert parsed.content == (None if name == "llama3_json" else "Let me look.")


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_plain_or_malformed_answers_have_no_calls(name):
    fmt = format_named(name)
    assert fmt.parse("Paris is sunny.").calls == []
    broken = ANSWERS[name][: len(ANSWERS[name]) // 2]
    assert fmt.parse(broken).calls == [] and fmt.parse(broken).content == broken


def test_llama3_answers_may_leave_out_the_python_tag():
    parsed = format_named("llama3_json").parse('{"name": "get_time", "parameters": {}}')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_time", "{}")]


@pytest.mark.parametrize("name", sorted(ANSWERS))
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_deltas_assemble_the_parsed_calls(name, step):
    fmt = format_named(name)
    implicit = '{"name"' if name == "llama3_json" else None
    stream = ToolCallStream(fmt, implicit_start=implicit)
    text, content, calls = ANSWERS[name], "", {}
    for end in [*range(step, len(text), step), len(text)]:
        delta = stream.push(text[:end], is_final=end == len(text))
        content += delta.content
        for call in delta.tool_calls:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id is not None:
                assert entry["id"] is None, "id and name come once, on the first delta"
                entry.update(id=call.id, name=call.name)
            entry["arguments"] += call.arguments
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == EXPECTED_CALLS
    assert all(calls[i]["id"].startswith("call_") for i in calls)
    assert content.strip() == (fmt.parse(text).content or "")


def test_streamed_content_holds_back_only_a_possible_marker():
    stream = ToolCallStream(format_named("hermes"))
    assert stream.push("Hello <tool").content == "Hello "
    assert stream.push("Hello <tooth", is_final=True).content == "<tooth"


@pytest.mark.parametrize(("template", "name"), [
    ("{% for m in messages %}{{ '[TOOL_CALLS]' }}{% endfor %}", "mistral"),
    ("{{- '<|python_tag|>' }}", "llama3_json"),
    ("<tool_call>{{ tools }}</tool_call>", "hermes"),
    (None, "hermes"),
])
def test_the_format_is_told_from_the_chat_template(template, name):
    assert detect_format(template).name == name


@pytest.fixture(scope="module")
def compiler(smollm2_dir) -> tuple[GuideCompiler, object]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return GuideCompiler(tokenizer, vocab_size=49152, stop_token_ids=[2]), tokenizer


@pytest.mark.parametrize("name", sorted(ANSWERS))
@pytest.mark.parametrize(("choice", "parallel"), [
    (ToolChoice("required"), True), (ToolChoice("required", "get_time"), False)])
def test_forced_calls_always_parse_against_the_schema(compiler, name, choice, parallel):
    """Constrained decoding over random logits: whatever the model prefers, the answer is
    one (or, in parallel, one or more) well-formed call of an allowed function."""
    guide_compiler, tokenizer = compiler
    fmt = format_named(name)
    guide = tool_guide(fmt, [WEATHER, TIME], choice, parallel=parallel)
    assert isinstance(guide, GuideSpec) and guide.param == "tool_choice"
    for seed in range(3):
        guided = GuidedDecoding(guide_compiler)
        generator = torch.Generator().manual_seed(seed)
        tokens: list[int] = []
        while not tokens or (tokens[-1] != 2 and len(tokens) < 300):
            logits = torch.randn(1, 49152, generator=generator) * 3
            logits[0, 2] += 6  # a model that would rather stop, once the grammar lets it
            rows = guided.mask(logits, ["r"], [guide])
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            guided.accept(["r"], [token], rows)
            tokens.append(token)
        assert tokens[-1] == 2
        text = tokenizer.decode(tokens[:-1])
        calls = fmt.parse(text).calls
        assert calls and (parallel or len(calls) == 1), text
        for call in calls:
            assert call.name in ({choice.function} if choice.function
                                 else {"get_weather", "get_time"})
            arguments = json.loads(call.arguments)
            if call.name == "get_weather":
                assert set(arguments) == {"city", "unit"}
                assert arguments["unit"] in ("celsius", "fahrenheit")
            else:
                assert set(arguments) == {"zone"} and len(arguments["zone"]) <= 6


def test_auto_and_none_force_nothing():
    fmt = format_named("hermes")
    assert tool_guide(fmt, [WEATHER], ToolChoice("auto"), parallel=True) is None
    assert tool_guide(fmt, [WEATHER], ToolChoice("none"), parallel=True) is None
