"""Constrained output on the tiny model (random weights: the worst case for a grammar):
every json_schema answer parses and validates, also with `ignore_eos` running past the
grammar's end, and the engine keeps serving."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.serving.api.conftest import MODEL_NAME

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "label": {"type": "string", "maxLength": 6},
    "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["id", "label", "flags"], "additionalProperties": False}


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_every_json_schema_answer_validates(live_server, ignore_eos):
    body = {"model": MODEL_NAME, "n": 8, "temperature": 1.0, "seed": 3, "max_tokens": 120,
            "ignore_eos": ignore_eos, "messages": [{"role": "user", "content": "Go"}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "item", "schema": SCHEMA}}}
    reply = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert len(choices) == 8
    for choice in choices:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        assert choice["finish_reason"] == ("length" if ignore_eos else "stop")
    health = httpx.get(f"{live_server.url}/ready", timeout=10)
    assert health.status_code == 200
    live_server.wait_idle()
