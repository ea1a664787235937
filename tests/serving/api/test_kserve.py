"""KServe v2 and Triton's generate extension against a live server with the tiny model:
`tritonclient.http` for health, metadata and infer (binary and JSON tensors); plain HTTP
for generate and generate_stream. Generated text is checked against /v1/completions with
the same greedy settings, so the KServe path is proven to produce the same tokens."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import httpx
import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

PROMPT = "Hello world"
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


def completion_text(live_server, prompt: str, **params) -> str:
    body = {"model": live_server.model, "prompt": prompt, **GREEDY, **params}
    response = httpx.post(f"{live_server.base_url}/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


@pytest.fixture
def client(live_server):
    client = tritonclient_http.InferenceServerClient(live_server.url.removeprefix("http://"))
    yield client
    client.close()


def text_input(prompts: list[str], *, binary: bool = True):
    tensor = tritonclient_http.InferInput("text_input", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=object),
                               binary_data=binary)
    return tensor


def bool_input(name: str, value: bool):
    tensor = tritonclient_http.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def post(live_server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{live_server.url}{path}", timeout=60, **kwargs)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines()
            if line.startswith("data: ")]


# -- health and metadata ---------------------------------------------------------------------

def test_health_and_metadata_through_tritonclient(client, live_server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(live_server.model)
    assert client.is_model_ready(live_server.model, model_version="1")
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata()
    assert server["name"] == "quiver" and "generate" in server["extensions"]
    model = client.get_model_metadata(live_server.model)
    assert model["name"] == live_server.model and model["versions"] == ["1"]
    inputs = {tensor["name"]: tensor for tensor in model["inputs"]}
    assert inputs["text_input"]["datatype"] == "BYTES"
    assert {o["name"] for o in model["outputs"]} >= {"text_output", "finish_reason"}


def test_unknown_model_or_version_is_404_with_error_body(client, live_server):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model")
    assert info.value.status() == "404" and "no-such-model" in info.value.message()
    for method, path in [("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"),
                         ("POST", "/v2/models/nope/infer"), ("POST", "/v2/models/nope/generate"),
                         ("POST", "/v2/models/nope/generate_stream"),
                         ("GET", f"/v2/models/{live_server.model}/versions/7")]:
        body = {"text_input": "x", "inputs": [{"name": "text_input", "shape": [1],
                                               "datatype": "BYTES", "data": ["x"]}]}
        body.pop("inputs" if path.endswith("generate") or "stream" in path else "text_input")
        response = httpx.request(method, f"{live_server.url}{path}", json=body, timeout=30)
        assert response.status_code == 404, path
        assert isinstance(response.json()["error"], str)


# -- infer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_infer_batch_matches_completions(client, live_server, binary):
    prompts = [PROMPT, "The cat sat"]
    result = client.infer(
        live_server.model, [text_input(prompts, binary=binary)], parameters=GREEDY,
        outputs=[tritonclient_http.InferRequestedOutput("text_output", binary_data=binary)])
    # Binary BYTES come back as bytes, JSON ones as str (as from Triton).
    texts = [v.decode() if binary else v for v in result.as_numpy("text_output")]
    # Like Triton's vLLM backend, a non-streamed text_output starts with the prompt.
    assert texts == [p + completion_text(live_server, p) for p in prompts]
    assert result.get_response()["model_name"] == live_server.model


def test_infer_optional_outputs_and_exclude_input(client, live_server):
    inputs = [text_input([PROMPT]), bool_input("exclude_input_in_output", True),
              bool_input("return_finish_reason", True),
              bool_input("return_num_output_tokens", True)]
    result = client.infer(live_server.model, inputs, parameters=GREEDY, request_id="req-7")
    assert result.as_numpy("text_output")[0].decode() == completion_text(live_server, PROMPT)
    assert result.as_numpy("finish_reason")[0].decode() == "length"
    assert result.as_numpy("num_output_tokens").tolist() == [GREEDY["max_tokens"]]
    assert result.get_response()["id"] == "req-7"


def test_infer_json_request_without_tritonclient(live_server):
    body = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES",
                        "data": [[PROMPT]]}],
            "parameters": {**GREEDY, "stop": "wi"}}
    response = post(live_server, f"/v2/models/{live_server.model}/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    expected = completion_text(live_server, PROMPT, stop="wi")
    assert output == {"name": "text_output", "shape": [1, 1], "datatype": "BYTES",
                      "data": [PROMPT + expected]}


BAD_INFER = [
    ({"inputs": []}, "inputs"),
    ({"inputs": [{"name": "other", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
     "text_input"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "INT32", "data": [1]}]},
     "BYTES"),
    ({"inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES", "data": ["x"]}]},
     "elements"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [1]}]},
     "strings"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"max_tokens": "many"}}, "max_tokens"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"temprature": 0}}, "temprature"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"top_p": 0}}, "top_p"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "outputs": [{"name": "logits"}]}, "logits"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"max_tokens": 10_000_000}}, "context"),
    ({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                 {"name": "stream", "shape": [1], "datatype": "BOOL", "data": [True]}]},
     "generate_stream"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_INFER)
def test_bad_infer_request_is_400_naming_the_problem(live_server, body, mentions):
    response = post(live_server, f"/v2/models/{live_server.model}/infer", json=body)
    assert response.status_code == 400, response.text
    assert mentions in response.json()["error"]


def test_bad_bodies_are_400(live_server):
    for path in ("infer", "generate", "generate_stream"):
        response = post(live_server, f"/v2/models/{live_server.model}/{path}",
                        content=b"{not json")
        assert response.status_code == 400 and "JSON" in response.json()["error"]
    response = post(live_server, f"/v2/models/{live_server.model}/infer", content=b"{}",
                    headers={"inference-header-content-length": "999"})
    assert response.status_code == 400 and "inference-header" in response.json()["error"]


# -- generate and generate_stream ------------------------------------------------------------

def test_generate_returns_text_and_requested_outputs(live_server):
    body = {"text_input": PROMPT, "parameters": GREEDY, "exclude_input_in_output": True,
            "return_finish_reason": True, "return_num_output_tokens": True,
            "return_num_input_tokens": True}
    response = post(live_server, f"/v2/models/{live_server.model}/generate", json=body)
    assert response.status_code == 200, response.text
    num_prompt_tokens = len(live_server.tokenizer.encode(PROMPT))
    assert response.json() == {
        "model_name": live_server.model, "model_version": "1",
        "text_output": completion_text(live_server, PROMPT), "finish_reason": "length",
        "num_input_tokens": num_prompt_tokens, "num_output_tokens": GREEDY["max_tokens"]}
    plain = post(live_server, f"/v2/models/{live_server.model}/versions/1/generate",
                 json={"text_input": PROMPT, "parameters": GREEDY}).json()
    assert plain["text_output"] == PROMPT + completion_text(live_server, PROMPT)
    assert "finish_reason" not in plain


def test_generate_stream_sends_sse_deltas(live_server):
    body = {"text_input": PROMPT, "parameters": GREEDY, "return_finish_reason": True,
            "return_num_output_tokens": True}
    with httpx.stream("POST", f"{live_server.url}/v2/models/{live_server.model}/"
                      "generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == completion_text(live_server, PROMPT)
    assert [e["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["finish_reason"] == "length"
    assert sum(e["num_output_tokens"] for e in events) == GREEDY["max_tokens"]


def greedy_token_ids(live_server, prompt: str, max_tokens: int) -> list[int]:
    from serving.backends.base import GenerationRequest
    from serving.engine.sampling_params import SamplingParams

    async def run() -> list[int]:
        request = GenerationRequest("greedy-ids", live_server.tokenizer.encode(prompt),
                                    SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True))
        return [token_id async for output in live_server.engine.generate(request)
                for delta in output.deltas for token_id in delta.new_token_ids]

    return asyncio.run(run())


def test_a_stop_token_ends_the_text_as_on_the_openai_endpoints(live_server):
    """One stop-token rule everywhere: the token that stopped the engine is counted but
    its text is not shown."""
    token_ids = greedy_token_ids(live_server, PROMPT, 12)
    stop = token_ids[4]
    num_generated = token_ids.index(stop) + 1
    params = {"max_tokens": 12, "temperature": 0, "stop_token_ids": [stop]}
    body = {"text_input": PROMPT, "parameters": params, "exclude_input_in_output": True,
            "return_finish_reason": True, "return_num_output_tokens": True}
    generated = post(live_server, f"/v2/models/{live_server.model}/generate", json=body).json()
    completion = httpx.post(f"{live_server.base_url}/completions", timeout=60, json={
        "model": live_server.model, "prompt": PROMPT, **params}).json()
    assert generated["text_output"] == completion["choices"][0]["text"]
    assert generated["text_output"] == \
        live_server.tokenizer.decode(token_ids[:num_generated - 1])
    assert generated["finish_reason"] == completion["choices"][0]["finish_reason"] == "stop"
    assert generated["num_output_tokens"] == completion["usage"]["completion_tokens"] == \
        num_generated


def test_generate_stream_errors_before_the_stream_are_json(live_server):
    cases = [({"parameters": {"temperature": -1}}, "temperature"),
             ({"exclude_input_in_output": False}, "exclude_input_in_output"),
             ({"parameters": {"seed": "x"}}, "seed"),
             ({"text_input": ""}, "empty")]
    for extra, mentions in cases:
        body = {"text_input": PROMPT, **extra}
        response = post(live_server, f"/v2/models/{live_server.model}/generate_stream",
                        json=body)
        assert response.status_code == 400, (extra, response.text)
        assert response.headers["content-type"] == "application/json"
        assert mentions in response.json()["error"]
    response = post(live_server, f"/v2/models/{live_server.model}/generate", json={})
    assert response.status_code == 400 and "text_input" in response.json()["error"]


# -- disconnects -----------------------------------------------------------------------------

def aborted_requests(live_server) -> float:
    text = httpx.get(f"{live_server.url}/metrics", timeout=10).text
    match = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$',
                      text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_stream_disconnect_aborts_the_engine_request(live_server):
    before = aborted_requests(live_server)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 400, "ignore_eos": True}}
    with httpx.stream("POST", f"{live_server.url}/v2/models/{live_server.model}/"
                      "generate_stream", json=body, timeout=60) as response:
        next(response.iter_lines())
    live_server.wait_idle()
    assert aborted_requests(live_server) == before + 1


def test_non_streamed_disconnect_aborts_the_engine_request(live_server):
    before = aborted_requests(live_server)
    payload = json.dumps({"text_input": PROMPT,
                          "parameters": {"max_tokens": 400, "ignore_eos": True}}).encode()
    host, port = live_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/%s/generate HTTP/1.1\r\nhost: test\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (live_server.model.encode(), len(payload), payload))
        wait_until_running(live_server)
    live_server.wait_idle()
    assert aborted_requests(live_server) == before + 1


def wait_until_running(live_server, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while live_server.engine.num_unfinished_requests == 0:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.01)
