"""What agent frameworks need, with the official SDK on the real SmolLM2: tool calling,
structured outputs and logit_bias — through `quiver up` (gateway + native engine) and
through `quiver serve --engine vllm` from `.venv-vllm`, the same tests for both."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import openai
import pydantic
import pytest

from tests.gateway.conftest import _http_ok, free_port, wait_until
from tests.quiver.test_up import start_up, stop

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
API_KEY = "qk-agent-features-test-key-0123456789"
WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description":
                                      "Current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20}},
                                          "required": ["city"]}}},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population: int


@dataclass
class Endpoint:
    client: openai.OpenAI
    model: str


def smollm2_up(smollm2_dir: Path, tmp_path: Path) -> Iterator[Endpoint]:
    process, log, port = start_up(tmp_path, "--model", str(smollm2_dir),
                                  env={"QUIVER_API_KEY": API_KEY})
    try:
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/ready")
                   or process.poll() is not None, 240, "quiver up")
        assert process.poll() is None, log.read()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY,
                           max_retries=0, timeout=120) as client:
            yield Endpoint(client, smollm2_dir.name)
    finally:
        stop(process, log)


def vllm_server(smollm2_dir: Path, tmp_path: Path) -> Iterator[Endpoint]:
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"{VLLM_PYTHON} is missing: create it with `make vllm`")
    port = free_port()
    log = (tmp_path / "vllm.log").open("w+")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    process = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "quiver", "serve", "--engine", "vllm", "--model",
         str(smollm2_dir), "--port", str(port), "--max-model-len", "2048",
         "--dtype", "float32"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/ready")
                   or process.poll() is not None, 600, "quiver serve --engine vllm")
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"the vllm server exited: {log.read()[-3000:]}")
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=120) as client:
            yield Endpoint(client, smollm2_dir.name)
    finally:
        process.terminate()
        process.wait(60)
        log.close()


@pytest.fixture(scope="module", params=["native", pytest.param("vllm", marks=pytest.mark.vllm)])
def endpoint(request, smollm2_dir, tmp_path_factory) -> Iterator[Endpoint]:
    start = smollm2_up if request.param == "native" else vllm_server
    yield from start(smollm2_dir, tmp_path_factory.mktemp(request.param))


def chat(endpoint: Endpoint, messages, **params):
    return endpoint.client.chat.completions.create(
        model=endpoint.model, messages=messages, temperature=0, **params)


def assert_valid_call(call, allowed: set[str]) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    arguments = json.loads(call.function.arguments)
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_required_gives_calls_whose_arguments_validate(endpoint):
    reply = chat(endpoint, ASK_WEATHER, tools=TOOLS, tool_choice="required",
                 parallel_tool_calls=False, max_tokens=96)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], {"get_weather", "get_time"})


def test_a_named_function_is_called_exactly_once(endpoint):
    reply = chat(endpoint, ASK_WEATHER, tools=TOOLS, max_tokens=96,
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert assert_valid_call(calls[0], {"get_time"})["city"]


def test_a_tool_result_round_trip_gets_an_answer(endpoint):
    first = chat(endpoint, ASK_WEATHER, tools=TOOLS, tool_choice="required",
                 parallel_tool_calls=False, max_tokens=96).choices[0].message
    call = first.tool_calls[0]
    messages = [*ASK_WEATHER, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    reply = chat(endpoint, messages, tools=TOOLS, tool_choice="none", max_tokens=48)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_streamed_calls_assemble_with_the_sdk_stream_helper(endpoint):
    expected = chat(endpoint, ASK_WEATHER, tools=TOOLS, tool_choice="required",
                    parallel_tool_calls=False, max_tokens=96).choices[0].message.tool_calls
    with endpoint.client.chat.completions.stream(
            model=endpoint.model, messages=ASK_WEATHER, tools=TOOLS, temperature=0,
            tool_choice="required", parallel_tool_calls=False, max_tokens=96) as stream:
        deltas = [event for event in stream if event.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in expected]
    assert len(deltas) > 1, "the arguments arrive in fragments, not in one piece"


@pytest.mark.parametrize("prompt", ["Tell me about Paris.", "Describe Tokyo as data.",
                                    "Give the facts about Berlin."])
def test_parse_with_a_pydantic_model_succeeds(endpoint, prompt):
    reply = endpoint.client.chat.completions.parse(
        model=endpoint.model, messages=[{"role": "user", "content": prompt}],
        response_format=City, temperature=0, max_tokens=128)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(reply.choices[0].message.parsed, City)


@pytest.mark.parametrize("prompt", ["Give me a JSON object describing a cat.",
                                    "Reply in JSON: what is 2 + 2?"])
def test_json_object_answers_are_json_objects(endpoint, prompt):
    reply = chat(endpoint, [{"role": "user", "content": prompt}], max_tokens=160,
                 response_format={"type": "json_object"}, frequency_penalty=1.0)
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_choice_answers_are_one_of_the_choices(endpoint):
    for question in ("Is the sky blue?", "Is fire cold?", "Can fish fly?"):
        reply = chat(endpoint, [{"role": "user", "content": question}], max_tokens=8,
                     extra_body={"structured_outputs": {"choice": ["yes", "no", "unsure"]}})
        assert reply.choices[0].message.content in ("yes", "no", "unsure")


def test_a_regex_constrains_the_answer(endpoint):
    reply = chat(endpoint, [{"role": "user", "content": "Give me a date."}], max_tokens=16,
                 extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", reply.choices[0].message.content)


def test_a_banned_greedy_token_changes_the_first_token(endpoint, smollm2_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Say hello."}]
    plain = chat(endpoint, messages, max_tokens=4, logprobs=True, top_logprobs=2)
    first = plain.choices[0].logprobs.content[0]
    token_ids = AutoTokenizer.from_pretrained(smollm2_dir).encode(first.token,
                                                                  add_special_tokens=False)
    assert len(token_ids) == 1, (first.token, token_ids)
    biased = chat(endpoint, messages, max_tokens=4, logprobs=True,
                  logit_bias={str(token_ids[0]): -100})
    assert biased.choices[0].logprobs.content[0].token != first.token
