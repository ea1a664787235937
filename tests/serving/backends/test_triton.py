"""The `triton` engine against a live Quiver server speaking Triton's generate extension:
the same greedy text as the native engine, directly and through a second server's OpenAI
API; errors mapped (unreachable -> EngineDeadError, upstream 400 -> InvalidRequestError);
aborts and early exits free the upstream request."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import aclosing

import httpx
import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("tritonclient.http")

from serving.api.app import create_app  # noqa: E402
from serving.backends.base import GenerationRequest  # noqa: E402
from serving.backends.factory import create_engine_client  # noqa: E402
from serving.backends.triton import TritonEngineClient, TritonTarget  # noqa: E402
from serving.engine.errors import EngineDeadError, InvalidRequestError  # noqa: E402
from serving.engine.request import FinishReason  # noqa: E402
from serving.engine.sampling_params import SamplingParams  # noqa: E402
from serving.settings import ServerSettings  # noqa: E402
from tests.serving.api.conftest import LiveServer, serve_in_thread, tiny_settings  # noqa: E402

PROMPT = "Hello world, the cat"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def upstream(tiny_model_dir) -> Iterator[LiveServer]:
    """A native Quiver server on the tiny model, for the triton engine to forward to."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = tiny_settings(tiny_model_dir)
    registry = CollectorRegistry()
    engine = create_engine_client(settings, registry)
    try:
        with serve_in_thread(create_app(settings, engine, tokenizer, registry)) as url:
            yield LiveServer(url, engine, tokenizer)
    finally:
        asyncio.run(engine.shutdown())


def triton_settings(model_dir, url: str, **overrides) -> ServerSettings:
    values = dict(model=model_dir, engine="triton", triton_url=url, triton_model="tiny",
                  served_model_name="tiny-over-triton")
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture
async def triton_engine(tiny_model_dir, upstream):
    engine = create_engine_client(triton_settings(tiny_model_dir, upstream.url),
                                  CollectorRegistry())
    assert isinstance(engine, TritonEngineClient)
    yield engine
    await engine.shutdown()


async def generate_ids(engine, request: GenerationRequest) -> tuple[list[int], FinishReason]:
    token_ids: list[int] = []
    finish_reason = None
    async for output in engine.generate(request):
        for delta in output.deltas:
            token_ids += delta.new_token_ids
            finish_reason = delta.finish_reason or finish_reason
    return token_ids, finish_reason


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_same_greedy_text_as_the_native_engine(triton_engine, upstream):
    assert await triton_engine.check_ready()
    assert triton_engine.is_ready
    prompt_token_ids = upstream.tokenizer.encode(PROMPT)
    native_ids, native_finish = await generate_ids(
        upstream.engine, GenerationRequest("native-1", prompt_token_ids, GREEDY))
    triton_ids, triton_finish = await generate_ids(
        triton_engine, GenerationRequest("triton-1", prompt_token_ids, GREEDY))
    decode = upstream.tokenizer.decode
    assert decode(triton_ids) == decode(native_ids)
    assert triton_finish == native_finish == FinishReason.LENGTH
    assert triton_engine.num_unfinished_requests == 0


def test_openai_api_over_the_triton_engine_matches_native(tiny_model_dir, upstream):
    settings = triton_settings(tiny_model_dir, upstream.url)
    registry = CollectorRegistry()
    engine = create_engine_client(settings, registry)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    try:
        app = create_app(settings, engine, upstream.tokenizer, registry)
        with serve_in_thread(app) as url:
            native = httpx.post(f"{upstream.url}/v1/completions", timeout=60,
                                json={**body, "model": "tiny"}).json()
            remote = httpx.post(f"{url}/v1/completions", timeout=60,
                                json={**body, "model": "tiny-over-triton"}).json()
            # From this thread: its connections are closed in the server's loop.
            asyncio.run(engine.shutdown())
    finally:
        asyncio.run(engine.shutdown())
    assert remote["model"] == "tiny-over-triton"
    assert remote["choices"][0]["text"] == native["choices"][0]["text"]
    assert remote["choices"][0]["finish_reason"] == "length"
    assert remote["usage"]["prompt_tokens"] == native["usage"]["prompt_tokens"]


async def test_unreachable_triton_is_engine_dead(tiny_model_dir):
    url = f"127.0.0.1:{free_port()}"
    engine = create_engine_client(triton_settings(tiny_model_dir, url), CollectorRegistry())
    try:
        assert not await engine.check_ready()
        assert not engine.is_ready
        with pytest.raises(EngineDeadError, match="cannot serve model tiny: Cannot connect"):
            await generate_ids(engine, GenerationRequest("r", [1, 2, 3], GREEDY))
    finally:
        await engine.shutdown()


async def test_upstream_400_is_invalid_request(triton_engine, upstream):
    too_long = SamplingParams(temperature=0.0, max_tokens=10_000_000)
    with pytest.raises(InvalidRequestError, match="400.*context length"):
        await generate_ids(triton_engine, GenerationRequest("r", [5, 6, 7], too_long))
    with pytest.raises(InvalidRequestError, match="drop `n`"):
        await generate_ids(triton_engine, GenerationRequest(
            "r", [5, 6, 7], SamplingParams(n=2, max_tokens=2)))


async def test_unknown_upstream_model_is_engine_dead(tiny_model_dir, upstream):
    settings = triton_settings(tiny_model_dir, upstream.url, triton_model="missing")
    engine = create_engine_client(settings, CollectorRegistry())
    try:
        assert not await engine.check_ready()
        with pytest.raises(EngineDeadError, match="missing"):
            await generate_ids(engine, GenerationRequest("r", [5, 6, 7], GREEDY))
    finally:
        await engine.shutdown()


async def test_abort_and_early_exit_free_the_upstream_request(triton_engine, upstream):
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    outputs = triton_engine.generate(GenerationRequest("abort-me", [5, 6, 7], long))
    first = await anext(outputs)
    assert not first.finished
    await triton_engine.abort("abort-me")
    rest = [output async for output in outputs]
    assert rest[-1].finished and rest[-1].deltas[0].finish_reason == FinishReason.ABORT
    await asyncio.to_thread(upstream.wait_idle)

    async with aclosing(triton_engine.generate(
            GenerationRequest("leave-early", [5, 6, 7], long))) as outputs:
        await anext(outputs)
    assert triton_engine.num_unfinished_requests == 0
    await asyncio.to_thread(upstream.wait_idle)


async def test_aborting_the_only_choice_ends_the_request(triton_engine, upstream):
    """One choice per request here (n > 1 is refused), so ending choice 0 ends it all."""
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    async with aclosing(triton_engine.generate(
            GenerationRequest("one-choice", [5, 6, 7], long))) as outputs:
        assert not (await anext(outputs)).finished
        await triton_engine.abort_choice("one-choice", 1)  # no such choice: ignored
        await triton_engine.abort_choice("one-choice", 0)
        rest = [output async for output in outputs]
    assert rest[-1].finished and rest[-1].deltas[0].finish_reason == FinishReason.ABORT
    assert sum(len(o.deltas[0].new_token_ids) for o in rest) < 400
    await asyncio.to_thread(upstream.wait_idle)


def test_a_stop_event_with_text_keeps_that_text():
    """The remote left its stop token out of `text_output` already; the serving layer
    hides the last token of a stopped delta, so the text must come in a delta of its own."""
    from serving.backends.triton import _outputs_of

    text, stop = _outputs_of("r", [5, 6], FinishReason.STOP, 3)
    assert (text.deltas[0].new_token_ids, text.deltas[0].finish_reason) == ([5, 6], None)
    assert not text.finished
    assert (stop.deltas[0].new_token_ids, stop.deltas[0].finish_reason) == ([], "stop")
    assert stop.finished
    [length] = _outputs_of("r", [5, 6], FinishReason.LENGTH, 3)
    assert length.deltas[0].new_token_ids == [5, 6] and length.finished
    assert _outputs_of("r", [], None, 3) == []


def test_target_accepts_tritonclient_and_http_urls():
    assert TritonTarget.parse("127.0.0.1:8000", "m").generate_stream_url == \
        "http://127.0.0.1:8000/v2/models/m/generate_stream"
    target = TritonTarget.parse("https://triton.example:443/", "a/b")
    assert (target.url, target.ssl) == ("triton.example:443", True)
    assert target.generate_stream_url.endswith("/v2/models/a%2Fb/generate_stream")
