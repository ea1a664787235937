"""`/v1/embeddings` on the native engine, with the official SDK: pooled hidden states,
normalised, float or base64, usage counted, limits and refusals named."""

from __future__ import annotations

import base64
import concurrent.futures
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.serving.api.conftest import MODEL_NAME


@pytest.fixture
def client(live_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live_server.base_url, api_key="unused",
                       max_retries=0) as sdk:  # closed, not left to the garbage collector
        yield sdk


def vectors(client, inputs, **params) -> list[np.ndarray]:
    reply = client.embeddings.create(model=MODEL_NAME, input=inputs, **params)
    assert [d.index for d in reply.data] == list(range(len(reply.data)))
    return [np.asarray(d.embedding, dtype=np.float64) for d in reply.data]


def test_identical_inputs_have_cosine_one_and_different_ones_less(client, live_server):
    same, again, other = vectors(client, ["the river runs west", "the river runs west",
                                          "quarterly revenue grew"])
    assert np.linalg.norm(same) == pytest.approx(1.0, abs=1e-5)
    assert float(same @ again) == pytest.approx(1.0, abs=1e-5)
    assert float(same @ other) < 0.999
    live_server.wait_idle()


def test_base64_decodes_to_the_same_vector(live_server, client):
    [as_floats] = vectors(client, "hello world", encoding_format="float")
    raw = httpx.post(f"{live_server.url}/v1/embeddings", timeout=30, json={
        "model": MODEL_NAME, "input": "hello world", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_floats, rtol=1e-6, atol=1e-7)


def test_token_id_input_is_the_same_as_its_text(client, live_server):
    token_ids = live_server.tokenizer.encode("hello world", add_special_tokens=False)
    [text], [ids] = vectors(client, "hello world"), vectors(client, [token_ids])
    np.testing.assert_allclose(text, ids, atol=1e-6)
    reply = client.embeddings.create(model=MODEL_NAME, input=["hello world", "a b"])
    expected = len(token_ids) + len(live_server.tokenizer.encode("a b",
                                                                  add_special_tokens=False))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == expected


def test_embeddings_share_the_engine_with_generation(client, live_server):
    """Embedding requests batch with running generations and leave no KV block behind."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        chats = [pool.submit(client.chat.completions.create, model=MODEL_NAME, max_tokens=24,
                             messages=[{"role": "user", "content": f"story {i}"}])
                 for i in range(2)]
        embeds = [pool.submit(vectors, client, [f"text number {i}" * 20]) for i in range(6)]
        assert all(c.result().choices[0].finish_reason for c in chats)
        first = embeds[0].result()[0]
    np.testing.assert_allclose(vectors(client, ["text number 0" * 20])[0], first, atol=1e-5)
    live_server.wait_idle()


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": [[10**9]]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "user": "u", "extra": 1}, "extra"),
    ({"input": ["x"] * 65}, "input"),
])
def test_bad_requests_are_400s_naming_the_field(live_server, body, param):
    reply = httpx.post(f"{live_server.url}/v1/embeddings", timeout=30,
                       json={"model": MODEL_NAME, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
