"""With `n > 1`, a choice whose text hits a stop string is aborted in the engine at once: it
stops generating (and frees its KV blocks) while its siblings go on.

A scripted engine proves the serving layer's part exactly: it generates one step per output
the server asks for, so what it generated after the stop string is known. The native engine
proves the rest on the tiny model: the stopped choice ends as an abort in the engine's
metrics instead of running on to max_tokens, and every KV block comes back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from serving.api.app import create_app
from serving.backends.base import GenerationRequest
from serving.engine.outputs import CompletionDelta, RequestOutput
from serving.engine.request import FinishReason
from tests.serving.api.conftest import MODEL_NAME, EngineStub, serve_in_thread, tiny_settings

STOPPED_TEXT = "The river runs west. Then it stops here and turns north again"
STOP = "stops"
SIBLING_TEXT = "one two three four five six seven eight nine ten"


class ScriptedEngine(EngineStub):
    """Choice i generates `scripts[i]`, one token per step, a step only when the server
    asks for the next output: what it generated when is exact. Records every choice's
    generated tokens and honours `abort_choice` as the `EngineClient` contract says."""

    def __init__(self, model_dir: Path, scripts: list[list[int]]) -> None:
        super().__init__(model_dir, MODEL_NAME, engine="scripted")
        self.scripts = scripts
        self.num_generated: dict[int, int] = {}
        self.aborted: list[tuple[str, int]] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        num_choices = request.params.n
        unfinished = set(range(num_choices))
        self.num_generated = dict.fromkeys(range(num_choices), 0)
        while unfinished:
            deltas = [self._step(request.request_id, index) for index in sorted(unfinished)]
            unfinished -= {delta.index for delta in deltas if delta.finish_reason is not None}
            yield RequestOutput(request.request_id, deltas, len(request.prompt_token_ids), 0,
                                finished=not unfinished)

    def _step(self, request_id: str, index: int) -> CompletionDelta:
        if (request_id, index) in self.aborted:
            return CompletionDelta(index, [], finish_reason=FinishReason.ABORT)
        script = self.scripts[index]
        position = self.num_generated[index]
        self.num_generated[index] += 1
        is_last = position + 1 == len(script)
        return CompletionDelta(index, [script[position]],
                               finish_reason=FinishReason.LENGTH if is_last else None)

    async def abort_choice(self, request_id: str, index: int) -> None:
        self.aborted.append((request_id, index))


def num_tokens_to_stop(tokenizer, token_ids: list[int], stop: str) -> int:
    """How many tokens it takes for the text to contain `stop`."""
    return next(k for k in range(1, len(token_ids) + 1)
                if stop in tokenizer.decode(token_ids[:k]))


def choices_of(response: httpx.Response, *, stream: bool) -> tuple[dict, dict, dict]:
    """Per choice index: text, finish_reason; and the usage."""
    if not stream:
        body = response.json()
        return ({c["index"]: c["text"] for c in body["choices"]},
                {c["index"]: c["finish_reason"] for c in body["choices"]}, body["usage"])
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line.removeprefix("data: "))
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons, usage


@pytest.mark.parametrize("stream", [False, True])
def test_a_stopped_choice_stops_generating_while_its_sibling_goes_on(
        tiny_model_dir, tiny_tokenizer, stream):
    scripts = [tiny_tokenizer.encode(text, add_special_tokens=False)
               for text in (STOPPED_TEXT, SIBLING_TEXT)]
    engine = ScriptedEngine(tiny_model_dir, scripts)
    app = create_app(tiny_settings(tiny_model_dir), engine, tiny_tokenizer, CollectorRegistry())
    body = {"model": MODEL_NAME, "prompt": "Hi", "n": 2, "stop": STOP, "max_tokens": 100,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    with serve_in_thread(app) as url:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    texts, reasons, usage = choices_of(response, stream=stream)
    assert texts == {0: STOPPED_TEXT[:STOPPED_TEXT.index(STOP)], 1: SIBLING_TEXT}
    assert reasons == {0: "stop", 1: "length"}
    num_to_stop = num_tokens_to_stop(tiny_tokenizer, scripts[0], STOP)
    assert num_to_stop < len(scripts[0]) - 3  # the stop string leaves tokens to spare
    # Choice 0 generated nothing past the token that completed the stop string, while
    # choice 1 generated its whole script; usage counts exactly what was generated.
    assert engine.num_generated == {0: num_to_stop, 1: len(scripts[1])}
    assert usage["completion_tokens"] == num_to_stop + len(scripts[1])
    assert len(engine.aborted) == 1 and engine.aborted[0][1] == 0


def test_a_single_choice_ends_by_leaving_the_stream(tiny_model_dir, tiny_tokenizer):
    """n = 1: no choice is left to go on, so the run just ends (which aborts the engine
    request) rather than asking the engine to end the choice first."""
    scripts = [tiny_tokenizer.encode(STOPPED_TEXT, add_special_tokens=False)]
    engine = ScriptedEngine(tiny_model_dir, scripts)
    app = create_app(tiny_settings(tiny_model_dir), engine, tiny_tokenizer, CollectorRegistry())
    with serve_in_thread(app) as url:
        response = httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": MODEL_NAME, "prompt": "Hi", "stop": STOP, "max_tokens": 100})
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert engine.aborted == []
    assert engine.num_generated == {0: num_tokens_to_stop(tiny_tokenizer, scripts[0], STOP)}


def test_the_native_engine_aborts_the_stopped_choice(live_server):
    """Seeded sampling: a stop string from choice 0's text that choice 1's never has. The
    stopped choice is aborted in the engine (not run on to max_tokens: generation tokens
    stay far below 2 x max_tokens) and the sibling runs to max_tokens."""
    max_tokens = 300
    body = {"model": live_server.model, "prompt": "Once upon a time", "n": 2, "seed": 11,
            "temperature": 1.0, "max_tokens": max_tokens, "ignore_eos": True}
    url = f"{live_server.base_url}/completions"
    free = httpx.post(url, json=body, timeout=60).json()["choices"]
    first, second = free[0]["text"], free[1]["text"]
    stop = next(first[i:i + 6] for i in range(len(first) // 4)
                if len(first[i:i + 6].strip()) == 6 and first[i:i + 6] not in second)
    live_server.wait_idle()
    before = {reason: live_server.metric("vllm:request_success_total", finished_reason=reason)
              for reason in ("abort", "length")}
    generated_before = live_server.metric("vllm:generation_tokens_total")
    response = httpx.post(url, json={**body, "stop": stop}, timeout=60).json()
    live_server.wait_idle()
    choices = response["choices"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert choices[0]["text"] == first[:first.index(stop)]
    assert live_server.metric("vllm:request_success_total", finished_reason="abort") == \
        before["abort"] + 1
    assert live_server.metric("vllm:request_success_total", finished_reason="length") == \
        before["length"] + 1
    generated = live_server.metric("vllm:generation_tokens_total") - generated_before
    assert max_tokens < generated < 2 * max_tokens
    assert response["usage"]["completion_tokens"] <= generated
