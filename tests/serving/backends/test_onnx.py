"""The onnx backend (onnxruntime-genai's Engine) on the tiny model exported by og's model
builder: same greedy tokens as the native engine, batching, aborts, stop conditions, and
clear rejections of what og cannot do."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from serving.backends import native
from serving.backends.base import GenerationRequest
from serving.backends.onnx import OnnxEngineClient
from serving.engine.errors import InvalidRequestError, PromptTooLongError
from serving.engine.sampling_params import SamplingParams
from serving.settings import ServerSettings
from serving.structured import GuideSpec
from tests.conftest import MODELS_DIR
from tests.greedy_paths import (
    FP32_KERNELS,
    GreedyStep,
    first_divergence,
    path_problems,
    steps_from,
    tokens_only,
)

pytestmark = pytest.mark.isa  # kernels and rounding: run under lower ISAs by `make test-isa`

pytest.importorskip("onnxruntime_genai", reason="the onnx backend needs onnxruntime-genai")

TEXTS = ["The quick brown fox", "def main():\n    return 0",
         "Prometheus scrapes every target", "a b c d e f g", "Hello, world!"]
MAX_TOKENS = 16


def build_onnx(model_dir: Path, dest: Path) -> Path:
    """og's model builder, fp32 on CPU; reused while `genai_config.json` is there."""
    if (dest / "genai_config.json").is_file():
        return dest
    work = dest.with_name(dest.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                    str(model_dir), "-o", str(work), "-p", "fp32", "-e", "cpu",
                    "-c", str(work / "cache")], check=True, capture_output=True, timeout=600)
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model_dir) -> Path:
    return build_onnx(tiny_model_dir, MODELS_DIR / "tiny-llama-onnx")


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    return [tokenizer.encode(text).ids for text in TEXTS]


@pytest.fixture
async def client(tiny_onnx_dir):
    registry = CollectorRegistry()
    client = OnnxEngineClient(tiny_onnx_dir, served_model_name="tiny", registry=registry,
                              device="cpu", max_num_seqs=4, max_model_len=256)
    client.registry = registry
    yield client
    await client.shutdown()


async def collect(client, request_id: str, prompt: list[int],
                  **params) -> tuple[list[list[int]], list[str | None]]:
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str | None] = {}
    request = GenerationRequest(request_id, prompt, SamplingParams(**params))
    async for output in client.generate(request):
        for delta in output.deltas:
            tokens.setdefault(delta.index, []).extend(delta.new_token_ids)
            reasons[delta.index] = delta.finish_reason and str(delta.finish_reason)
    return [tokens[i] for i in sorted(tokens)], [reasons[i] for i in sorted(tokens)]


def native_greedy_steps(model_dir: Path, prompts: list[list[int]],
                        **params) -> list[list[GreedyStep]]:
    """The native engine's greedy steps in float32, with their top-5 logprobs."""
    async def one(engine, request_id: str, prompt: list[int]) -> list[GreedyStep]:
        request = GenerationRequest(request_id, prompt, SamplingParams(logprobs=5, **params))
        tokens, logprobs = [], []
        async for output in engine.generate(request):
            for delta in output.deltas:
                tokens.extend(delta.new_token_ids)
                logprobs.extend(delta.logprobs or [])
        return steps_from(tokens, logprobs)

    async def run() -> list[list[GreedyStep]]:
        settings = ServerSettings(model=model_dir, dtype="float32", device="cpu",
                                  kv_cache_memory=0.25)
        engine = native.create(settings, CollectorRegistry())
        try:
            return list(await asyncio.gather(*(one(engine, f"n{i}", prompt)
                                               for i, prompt in enumerate(prompts))))
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def metric(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, {"model_name": "tiny", **labels}) or 0.0


async def test_greedy_paths_agree_with_the_native_engine(client, tiny_model_dir, prompts):
    """onnxruntime's MLAS and our kernels both run fp32 but round differently: the paths
    agree except where the native engine saw a near-tie (the ONNX engine reports no
    logprobs, so only the native side is judged)."""
    results = await asyncio.gather(*(collect(client, f"g{i}", prompt, temperature=0.0,
                                             max_tokens=MAX_TOKENS)
                                     for i, prompt in enumerate(prompts)))
    expected = await asyncio.to_thread(native_greedy_steps, tiny_model_dir, prompts,
                                       temperature=0.0, max_tokens=MAX_TOKENS)
    problems = {i: path_problems(ours, tokens_only(tokens[0]), **FP32_KERNELS)
                for i, (ours, (tokens, _)) in enumerate(zip(expected, results, strict=True))}
    assert not any(problems.values()), problems
    for ours, (tokens, _) in zip(expected, results, strict=True):
        if first_divergence(ours, tokens_only(tokens[0])) is None:
            assert len(tokens[0]) == len(ours)
    assert client.info.engine == "onnx" and client.info.max_model_len == 256


async def test_concurrent_requests_all_complete_across_batches(client, prompts):
    lengths = [3, 17, 5, 30, 9, 12, 1, 25, 8, 4]  # 10 requests, batches of at most 4
    results = await asyncio.gather(*(
        collect(client, f"c{i}", prompts[i % len(prompts)], temperature=0.0, max_tokens=n,
                ignore_eos=True) for i, n in enumerate(lengths)))
    assert [len(tokens[0]) for tokens, _ in results] == lengths
    assert all(reasons == ["length"] for _, reasons in results)
    assert client.num_unfinished_requests == 0
    registry = client.registry
    assert metric(registry, "vllm:generation_tokens_total") == sum(lengths)
    assert metric(registry, "vllm:request_success_total", finished_reason="length") == 10
    assert metric(registry, "vllm:e2e_request_latency_seconds_count") == 10
    assert metric(registry, "vllm:num_requests_running") == 0


async def test_n_choices_and_sampling(client, prompts):
    tokens, reasons = await collect(client, "n3", prompts[0], n=3, temperature=1.0, top_p=0.9,
                                    top_k=50, max_tokens=8, ignore_eos=True)
    assert len(tokens) == 3 and all(len(choice) == 8 for choice in tokens)
    assert len({tuple(choice) for choice in tokens}) > 1
    assert reasons == ["length"] * 3


async def test_leaving_the_stream_early_aborts_the_request(client, prompts):
    stream = client.generate(GenerationRequest(
        "long", prompts[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)))
    num_outputs = 0
    async for _ in stream:
        num_outputs += 1
        if num_outputs == 2:
            break
    await stream.aclose()
    assert client.num_unfinished_requests == 0
    deadline = time.monotonic() + 5
    while client.num_og_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert client.num_og_requests == 0  # its og request is cancelled and closed
    assert metric(client.registry, "vllm:request_success_total", finished_reason="abort") == 1
    tokens, reasons = await collect(client, "after", prompts[0], temperature=0.0, max_tokens=4)
    assert len(tokens[0]) == 4 and reasons == ["length"]


async def test_aborting_one_choice_stops_it_while_its_siblings_go_on(client, prompts):
    """After `abort_choice` the choice generates nothing more (outputs already made still
    arrive: every token it got was generated before the abort, as the generation metric
    shows), its og request is closed, and the other choice runs on to max_tokens."""
    request = GenerationRequest("pair", prompts[0], SamplingParams(
        n=2, temperature=0.0, max_tokens=120, ignore_eos=True))
    tokens: dict[int, list[int]] = {0: [], 1: []}
    reasons: dict[int, str] = {}
    async with aclosing(client.generate(request)) as outputs:
        async for output in outputs:
            for delta in output.deltas:
                tokens[delta.index].extend(delta.new_token_ids)
                if delta.finish_reason is not None:
                    reasons[delta.index] = str(delta.finish_reason)
            if tokens[0] and 0 not in reasons:
                await client.abort_choice("pair", 0)
    assert reasons == {0: "abort", 1: "length"}
    assert len(tokens[0]) < 120 and len(tokens[1]) == 120
    assert metric(client.registry, "vllm:generation_tokens_total") == len(tokens[0]) + 120
    assert metric(client.registry, "vllm:request_success_total", finished_reason="abort") == 1
    assert metric(client.registry, "vllm:request_success_total", finished_reason="length") == 1
    deadline = time.monotonic() + 5
    while client.num_og_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert client.num_og_requests == 0


async def test_stop_token_ends_the_choice_including_it(client, prompts):
    (greedy,), _ = await collect(client, "g", prompts[1], temperature=0.0, max_tokens=12,
                                 ignore_eos=True)
    stop = greedy[5]
    first = greedy.index(stop)
    tokens, reasons = await collect(client, "s", prompts[1], temperature=0.0, max_tokens=12,
                                    stop_token_ids=(stop,))
    assert tokens == [greedy[:first + 1]] and reasons == ["stop"]
    tokens, _ = await collect(client, "m", prompts[1], temperature=0.0, max_tokens=12,
                              stop_token_ids=(stop,), min_tokens=first + 2)
    assert tokens[0] == greedy[:len(tokens[0])] and len(tokens[0]) > first + 1


async def test_eos_stops_unless_ignored(tiny_onnx_dir, tmp_path, prompts):
    """Make the first greedy token the EOS: og must not stop by itself, we must."""
    model_dir = tmp_path / "eos"
    shutil.copytree(tiny_onnx_dir, model_dir)
    probe = OnnxEngineClient(tiny_onnx_dir, served_model_name="tiny",
                             registry=CollectorRegistry(), device="cpu")
    try:
        (greedy,), _ = await collect(probe, "g", prompts[2], temperature=0.0, max_tokens=6)
    finally:
        await probe.shutdown()
    config = json.loads((model_dir / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = greedy[0]
    (model_dir / "genai_config.json").write_text(json.dumps(config))
    client = OnnxEngineClient(model_dir, served_model_name="tiny", registry=CollectorRegistry(),
                              device="cpu")
    try:
        tokens, reasons = await collect(client, "e", prompts[2], temperature=0.0, max_tokens=6)
        assert tokens == [greedy[:1]] and reasons == ["stop"]
        tokens, reasons = await collect(client, "i", prompts[2], temperature=0.0, max_tokens=6,
                                        ignore_eos=True)
        assert tokens == [greedy] and reasons == ["length"]
    finally:
        await client.shutdown()


async def test_json_schema_guides_use_og_guidance(client, prompts):
    schema = {"x-guidance": {"whitespace_flexible": False}, "type": "object",
              "properties": {"a": {"enum": ["x"]}}, "required": ["a"],
              "additionalProperties": False}
    tokens, reasons = await collect(client, "j", prompts[0], guide=GuideSpec.json_schema(schema),
                                    temperature=0.0, max_tokens=20)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(client.info.model_dir / "tokenizer.json"))
    assert json.loads(tokenizer.decode(tokens[0])) == {"a": "x"}
    assert reasons == ["stop"]
    assert client.info.supports_structured_output


@pytest.mark.parametrize(("params", "param"), [
    ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"min_p": 0.1}, "min_p"),
    ({"seed": 7, "temperature": 0.8}, "seed"),
    ({"logit_bias": ((5, 1.0),)}, "logit_bias"),
    ({"guide": GuideSpec.grammar('root ::= "a"', param="structured_outputs.grammar")},
     "structured_outputs.grammar"),
    ({"guide": GuideSpec.structural_tag({"type": "structural_tag"}, param="tool_choice")},
     "tool_choice"),
])
async def test_unsupported_params_are_rejected_by_name(client, prompts, params, param):
    with pytest.raises(InvalidRequestError, match="the onnx engine") as info:
        await collect(client, "bad", prompts[0], **params)
    assert info.value.param == param
    assert client.num_unfinished_requests == 0


async def test_bad_prompts_are_rejected(client, prompts):
    with pytest.raises(PromptTooLongError, match="maximum context length is 256"):
        await collect(client, "long", prompts[0] * 100, max_tokens=4)
    with pytest.raises(PromptTooLongError):
        await collect(client, "long2", prompts[0], max_tokens=256)
    with pytest.raises(InvalidRequestError) as info:
        await collect(client, "empty", [], max_tokens=4)
    assert info.value.param == "prompt"
    # A seed with greedy decoding changes nothing, so it is accepted.
    tokens, _ = await collect(client, "seeded", prompts[0], seed=3, temperature=0.0, max_tokens=3)
    assert len(tokens[0]) == 3


def test_a_dir_without_genai_config_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="not an onnxruntime-genai artifact"):
        OnnxEngineClient(tiny_model_dir, served_model_name="x", registry=CollectorRegistry())
