"""Smoke test on the real SmolLM2-135M-Instruct through the official SDK."""

from __future__ import annotations

import asyncio

import openai
import pytest
from prometheus_client import CollectorRegistry

from serving.api.app import create_app
from tests.serving.api.conftest import serve_in_thread, tiny_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_url(smollm2_dir):
    from transformers import AutoTokenizer

    from serving.backends.factory import create_engine_client

    settings = tiny_settings(smollm2_dir, served_model_name="smollm2", dtype="auto",
                             kv_cache_memory=0.25)
    registry = CollectorRegistry()
    engine = create_engine_client(settings, registry)
    try:
        app = create_app(settings, engine, AutoTokenizer.from_pretrained(smollm2_dir), registry)
        with serve_in_thread(app) as url:
            yield url
    finally:
        asyncio.run(engine.shutdown())


def test_capital_of_france_is_paris(smollm2_url):
    with openai.OpenAI(base_url=f"{smollm2_url}/v1", api_key="unused",
                       max_retries=0) as client:
        response = client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=32,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in response.choices[0].message.content
        assert response.choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=32, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == response.choices[0].message.content
