"""Nothing silently dropped: every parameter of OpenAI's chat and completions APIs, as the
installed `openai` SDK defines them, is honoured, accepted as having no effect on the
answer, or refused with a 400 naming it — and an unknown one is refused too.

The tables below must cover the SDK's parameters exactly: a new SDK release that adds one
fails `test_every_sdk_parameter_is_classified` until someone decides what Quiver does.
"""

from __future__ import annotations

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from tests.serving.api.conftest import MODEL_NAME

MESSAGES = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 4}},
    "required": ["q"], "additionalProperties": False}}}

# name -> a value that would change the answer (or, for "accepted", a real value)
CHAT_HONOURED = {
    "messages": MESSAGES, "model": MODEL_NAME, "frequency_penalty": 0.5,
    "logit_bias": {"5": -100}, "logprobs": True, "top_logprobs": 2,
    "max_completion_tokens": 3, "max_tokens": 3, "n": 2, "presence_penalty": 0.5,
    "seed": 7, "stop": ["zz"], "temperature": 0.5, "top_p": 0.9,
    "stream_options": None,  # checked with streams in test_streaming.py
    "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
}
CHAT_ACCEPTED = {
    "metadata": {"team": "a"}, "store": False, "service_tier": "auto", "user": "u-1",
    "safety_identifier": "s-1", "prompt_cache_key": "conversation-1",
    "prompt_cache_retention": "in_memory",
}
CHAT_REFUSED = {
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
    "functions": [TOOL["function"]], "function_call": "auto", "reasoning_effort": "low",
    "verbosity": "low", "moderation": {"model": "omni"}, "prompt_cache_options": {},
}
COMPLETION_HONOURED = {
    "model": MODEL_NAME, "prompt": "Hello", "echo": True, "frequency_penalty": 0.5,
    "logit_bias": {"5": -100}, "logprobs": 2, "max_tokens": 3, "n": 2,
    "presence_penalty": 0.5, "seed": 7, "stop": "zz", "temperature": 0.5, "top_p": 0.9,
    "stream_options": None, "best_of": 2,
}
COMPLETION_ACCEPTED = {"user": "u-1"}
COMPLETION_REFUSED = {"suffix": "tail", "best_of": 3}


def post(live_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live_server.url}{path}", json=body, timeout=60)


def test_every_sdk_parameter_is_classified():
    chat = set(chat_create_params.CompletionCreateParamsBase.__annotations__)
    assert chat == set(CHAT_HONOURED) | set(CHAT_ACCEPTED) | set(CHAT_REFUSED)
    completions = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert completions == (set(COMPLETION_HONOURED) | set(COMPLETION_ACCEPTED)
                           | set(COMPLETION_REFUSED))


@pytest.mark.parametrize("name", sorted(set(CHAT_HONOURED) | set(CHAT_ACCEPTED)
                                        - {"messages", "model", "stream_options"}))
def test_chat_parameters_are_honoured_or_accepted(live_server, name):
    value = {**CHAT_HONOURED, **CHAT_ACCEPTED}[name]
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    if name in ("tool_choice", "parallel_tool_calls"):
        body["tools"] = [TOOL]
    response = post(live_server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("name", sorted(CHAT_REFUSED))
def test_chat_parameters_no_engine_here_honours_are_refused_by_name(live_server, name):
    body = {"model": MODEL_NAME, "messages": MESSAGES, name: CHAT_REFUSED[name]}
    response = post(live_server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == name


@pytest.mark.parametrize("name", sorted(set(COMPLETION_HONOURED) | set(COMPLETION_ACCEPTED)
                                        - {"model", "prompt", "stream_options"}))
def test_completion_parameters_are_honoured_or_accepted(live_server, name):
    value = {**COMPLETION_HONOURED, **COMPLETION_ACCEPTED}[name]
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, name: value}
    if name == "best_of":
        body["n"] = 2
    response = post(live_server, "/v1/completions", body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("name", sorted(COMPLETION_REFUSED))
def test_completion_parameters_no_engine_here_honours_are_refused_by_name(live_server, name):
    body = {"model": MODEL_NAME, "prompt": "Hello", name: COMPLETION_REFUSED[name]}
    response = post(live_server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == name


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_unknown_parameter_is_refused_by_name(live_server, path):
    body = {"model": MODEL_NAME, "max_tokens": 2, "guided_json": {"type": "object"},
            **({"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"})}
    response = post(live_server, path, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "guided_json"
    assert error["message"] == "Unrecognized request argument supplied: guided_json"


@pytest.mark.parametrize(("body", "param"), [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]"),
])
def test_bad_values_are_400s_naming_the_field(live_server, body, param):
    request = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, **body}
    response = post(live_server, "/v1/chat/completions", request)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
