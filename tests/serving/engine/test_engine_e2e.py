"""The native engine end to end: `build_engine` -> AsyncEngine -> model, on real models.

Staggered concurrent requests through the async front end must give exactly the tokens
Hugging Face `generate` gives for each request alone (greedy), under a KV budget so small
that preemption happens too; seeded sampling must not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import corpus
from serving.engine import SamplingParams
from serving.engine.factory import EngineSettings, build_engine

pytestmark = pytest.mark.isa  # kernels and rounding: run under lower ISAs by `make test-isa`

GIB = 1 << 30


def prompts_from_text(tokenizer, lengths: list[int], shared_prefix: int) -> list[list[int]]:
    """Prompts of the given lengths; every third one starts with the same prefix."""
    ids = tokenizer("\n\n".join(corpus.documents("evaluation")))["input_ids"]
    prefix = ids[:shared_prefix]
    prompts = []
    for i, length in enumerate(lengths):
        start = 1000 + 997 * i
        body = ids[start:start + length]
        prompts.append((prefix + body)[:length] if i % 3 == 0 else body)
    return prompts


def hf_greedy(model_dir, prompts, max_tokens: int, dtype=torch.float32) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            input_ids = torch.tensor([prompt])
            generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                       do_sample=False, max_new_tokens=max_tokens)
            outputs.append(generated[0, len(prompt):].tolist())
    return outputs


async def run_staggered(engine, prompts, params_for, gap_s: float = 0.01) -> list[list[int]]:
    async def one(index: int, prompt: list[int]) -> list[int]:
        await asyncio.sleep(index * gap_s)
        tokens: list[int] = []
        async for output in engine.generate(prompt, params_for(index), f"req-{index}"):
            for delta in output.deltas:
                tokens.extend(delta.new_token_ids)
        return tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def metric(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name, {"model_name": "test"}) or 0.0


def start_engine(model_dir, registry, **overrides):
    settings = EngineSettings(model=model_dir, dtype="float32", **overrides)
    return build_engine(settings, model_name="test", registry=registry)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [1, 2, 7, 16, 17, 33, 64, 100, 128, 150, 200, 257, 300, 333, 400, 450, 499, 500]
    random.Random(0).shuffle(lengths)
    return prompts_from_text(tokenizer, lengths, shared_prefix=48)


@pytest.fixture(scope="module")
def tiny_expected(tiny_model_dir, tiny_prompts):
    return hf_greedy(tiny_model_dir, tiny_prompts, max_tokens=24)


@pytest.mark.parametrize("kv_blocks", [None, 40], ids=["roomy-kv", "preempting-kv"])
async def test_staggered_batch_matches_hf_token_for_token(tiny_model_dir, tiny_prompts,
                                                          tiny_expected, kv_blocks):
    registry = CollectorRegistry()
    overrides = {"max_num_batched_tokens": 256, "max_num_seqs": 16}
    if kv_blocks is not None:  # 40 blocks x 16 tokens: the batch cannot all fit at once
        per_block = 2 * 2 * 16 * 2 * 16 * 4  # K,V x layers x block x kv heads x dims x fp32
        overrides.update(kv_cache_memory_gib=kv_blocks * per_block / GIB, max_model_len=640)
    engine = start_engine(tiny_model_dir, registry, **overrides)
    try:
        outputs = await run_staggered(
            engine, tiny_prompts, lambda i: SamplingParams(temperature=0.0, max_tokens=24))
    finally:
        engine.shutdown()
    for index, (got, want) in enumerate(zip(outputs, tiny_expected, strict=True)):
        assert got == want, f"request {index} (prompt of {len(tiny_prompts[index])} tokens)"
    assert metric(registry, "vllm:prefix_cache_hits_total") > 0
    assert metric(registry, "vllm:kv_cache_usage_perc") == 0
    assert metric(registry, "vllm:num_requests_running") == 0
    if kv_blocks is not None:
        assert metric(registry, "vllm:num_preemptions_total") > 0


async def test_seeded_sampling_ignores_batch_composition(tiny_model_dir, tiny_prompts):
    def seeded(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234 + i,
                              max_tokens=16, ignore_eos=True)

    runs = []
    for prompts, params_for in (
        (tiny_prompts[:1], seeded),                                   # alone
        (tiny_prompts[:8], seeded),                                   # with seeded neighbours
        (tiny_prompts[:8], lambda i: seeded(0) if i == 0 else SamplingParams(
            temperature=1.0, max_tokens=16)),                         # with unseeded ones
    ):
        engine = start_engine(tiny_model_dir, CollectorRegistry())
        try:
            runs.append(await run_staggered(engine, prompts, params_for, gap_s=0.0))
        finally:
            engine.shutdown()
    alone, batched, mixed = runs
    assert alone[0] == batched[0] == mixed[0]
    assert len(set(map(tuple, batched))) > 1  # different seeds, different samples


def test_bad_settings_are_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineSettings(model=tiny_model_dir, dtype="float64")
    with pytest.raises(ValueError, match="is not a model dir"):
        EngineSettings(model=tmp_path)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 16"):
        start_engine(tiny_model_dir, None, max_num_seqs=16, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="larger than the model's max_position_embeddings"):
        start_engine(tiny_model_dir, None, max_model_len=1 << 20)


@pytest.mark.slow
async def test_smollm2_answers_through_the_engine(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=True)["input_ids"]
    registry = CollectorRegistry()
    engine = build_engine(EngineSettings(model=smollm2_dir), model_name="test",
                          registry=registry)
    try:
        tokens: list[int] = []
        async for output in engine.generate(prompt, SamplingParams(temperature=0.0,
                                                                   max_tokens=20), "paris"):
            tokens.extend(output.deltas[0].new_token_ids)
    finally:
        engine.shutdown()
    assert "Paris" in tokenizer.decode(tokens, skip_special_tokens=True)
    assert metric(registry, "vllm:generation_tokens_total") == len(tokens)


def test_auto_dtype_picks_the_fastest_exact_choice_per_device(tiny_model_dir, monkeypatch):
    from serving.engine import factory
    from serving.models.compressed import QuantizationConfig
    from serving.models.config import ModelArchConfig

    arch = ModelArchConfig.from_model_dir(tiny_model_dir)
    bf16_arch = ModelArchConfig(**{**arch.__dict__, "dtype": torch.bfloat16})
    cpu = torch.device("cpu")
    monkeypatch.setattr(factory, "cpu_has_fast_bf16", lambda: False)
    assert factory.resolve_dtype("auto", bf16_arch, cpu) == torch.float32
    assert factory.resolve_dtype("bfloat16", bf16_arch, cpu) == torch.bfloat16
    monkeypatch.setattr(factory, "cpu_has_fast_bf16", lambda: True)
    assert factory.resolve_dtype("auto", bf16_arch, cpu) == torch.bfloat16
    assert factory.resolve_dtype("auto", arch, cpu) == torch.float32
    assert factory.resolve_dtype("auto", bf16_arch, torch.device("cuda")) == torch.bfloat16
    # weight-only int8/int4: bf16 where it is native; without it float32 where Quiver's
    # float32 low-bit kernels take every scheme, else bf16 (torch's are scalar in float32)
    per_channel_int8 = QuantizationConfig.from_dict({
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}}})
    grouped_int8 = QuantizationConfig.from_dict({
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 32}}}})
    for fast_bf16, lowbit, quantization, expected in [
            (True, True, per_channel_int8, torch.bfloat16),
            (False, True, per_channel_int8, torch.float32),
            (False, False, per_channel_int8, torch.bfloat16),  # no C++ library, or no AVX2
            (False, True, grouped_int8, torch.bfloat16)]:  # torch's kernel: bf16 vectorised
        monkeypatch.setattr(factory, "cpu_has_fast_bf16", lambda fast=fast_bf16: fast)
        assert factory.resolve_dtype("auto", bf16_arch, cpu, quantization=quantization,
                                     float32_lowbit_kernels=lowbit) == expected
        assert factory.resolve_dtype("float32", arch, cpu, quantization=quantization,
                                     float32_lowbit_kernels=lowbit) == torch.float32
