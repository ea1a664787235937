"""Every error in OpenAI's shape, with the status, type, param and code the SDKs map."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.serving.api.conftest import fake_server

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(live_server):
    with openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0,
                       timeout=60) as sdk:  # closed, not left to the garbage collector
        yield sdk


def assert_error(response: httpx.Response, status: int, *, param=None, code=None,
                 type_="invalid_request_error") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type_, param, code)
    return error


def post(live_server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{live_server.base_url}{path}", timeout=60, **kwargs)


def test_malformed_json_is_a_400(live_server):
    response = post(live_server, "/chat/completions", content=b'{"model": "tiny", "mess',
                    headers={"content-type": "application/json"})
    assert_error(response, 400, code="invalid_json")


def test_body_that_is_not_an_object_is_a_400(live_server):
    assert_error(post(live_server, "/completions", json=[1, 2, 3]), 400)


@pytest.mark.parametrize(("field", "value", "param"), [
    ("temperature", "hot", "temperature"),
    ("temperature", 2.5, "temperature"),
    ("top_p", 0, "top_p"),
    ("n", 0, "n"),
    ("n", True, "n"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", "12", "max_tokens"),
    ("presence_penalty", 3, "presence_penalty"),
    ("seed", 2**70, "seed"),
    ("top_logprobs", 50, "top_logprobs"),
    ("stop", [1, 2], "stop"),
    ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ("min_p", 1.5, "min_p"),
    ("top_k", -5, "top_k"),
])
def test_wrong_type_or_out_of_range_names_the_param(live_server, field, value, param):
    body = {"model": live_server.model, "messages": HI, "max_tokens": 4, field: value}
    assert_error(post(live_server, "/chat/completions", json=body), 400, param=param)


def test_sdk_sees_bad_request_with_param(client, live_server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=live_server.model, messages=HI, temperature=-1)
    assert exc.value.status_code == 400 and exc.value.param == "temperature"
    assert exc.value.type == "invalid_request_error"


def test_top_logprobs_without_logprobs(live_server):
    body = {"model": live_server.model, "messages": HI, "top_logprobs": 2}
    assert_error(post(live_server, "/chat/completions", json=body), 400, param="top_logprobs")


def test_suffix_is_rejected_clearly(client, live_server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=live_server.model, prompt="def f(", suffix="return 1")
    assert exc.value.param == "suffix" and "suffix" in exc.value.message


def test_token_ids_outside_the_vocabulary(live_server):
    body = {"model": live_server.model, "prompt": [1, 2, 10**6]}
    assert_error(post(live_server, "/completions", json=body), 400, param="prompt")


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-17", messages=HI)
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"
    assert exc.value.param == "model"


def test_too_long_is_a_400_with_the_counts(client, live_server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=live_server.model, messages=HI, max_tokens=5000)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    assert "2048" in exc.value.message and "5000 for the completion" in exc.value.message
    long_prompt = [5] * 2100
    response = post(live_server, "/completions",
                    json={"model": live_server.model, "prompt": long_prompt})
    error = assert_error(response, 400, param="prompt", code="context_length_exceeded")
    assert "2100 in the prompt" in error["message"]


def test_body_over_the_limit_is_a_413(live_server):
    body = b'{"model": "tiny", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    response = post(live_server, "/completions", content=body,
                    headers={"content-type": "application/json"})
    assert_error(response, 413, code="request_too_large")


def test_unknown_route_is_a_json_404(live_server):
    response = httpx.get(f"{live_server.base_url}/nothing-here", timeout=10)
    assert_error(response, 404, code="not_found")


def test_request_id_is_echoed_or_minted(live_server):
    echoed = httpx.get(f"{live_server.url}/health", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    minted = httpx.get(f"{live_server.url}/health", headers={"x-request-id": "bad id\t!"})
    assert minted.headers["x-request-id"] not in ("", "bad id\t!")


def test_queue_full_is_a_503_with_retry_after(tiny_model_dir, tiny_tokenizer):
    with fake_server("queue_full", tiny_model_dir, tiny_tokenizer) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                              json={"model": "tiny", "messages": HI})
        assert_error(response, 503, type_="service_unavailable", code="queue_full")
        assert response.headers["retry-after"] == "3"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model="tiny", messages=HI, stream=True)
        assert exc.value.status_code == 503


def test_unexpected_failure_is_a_500_with_the_request_id(tiny_model_dir, tiny_tokenizer,
                                                         caplog):
    with fake_server("crash", tiny_model_dir, tiny_tokenizer) as url, \
            caplog.at_level(logging.ERROR, logger="serving.api.openai_routes"):
        response = httpx.post(f"{url}/v1/completions", timeout=10,
                              headers={"x-request-id": "req-500-test"},
                              json={"model": "tiny", "prompt": "Hi"})
    error = assert_error(response, 500, type_="server_error", code="internal_error")
    assert "req-500-test" in error["message"] and "kaboom" not in error["message"]
    [record] = [r for r in caplog.records if "req-500-test" in r.getMessage()]
    assert record.exc_info and "kaboom in the engine" in str(record.exc_info[1])
