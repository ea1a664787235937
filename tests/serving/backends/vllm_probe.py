"""Drive the vllm backend on a model and print one JSON object of results (last stdout line).

Run by tests/serving/backends/test_vllm.py with `.venv-vllm/bin/python`, because vLLM
cannot share the main venv:

    .venv-vllm/bin/python tests/serving/backends/vllm_probe.py --model DIR --prompts JSON

`--prompts` is a JSON list of token-id lists. Every check is recorded, not asserted: the
test asserts, so a failure shows the whole picture.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

GREEDY_MAX_TOKENS = 16
JSON_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}},
               "required": ["a"], "additionalProperties": False}


async def collect(client, request) -> dict[str, Any]:
    """Run one request to the end: tokens and finish reason per choice."""
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    num_cached = 0
    async for output in client.generate(request):
        num_cached = output.num_cached_tokens
        for delta in output.deltas:
            tokens.setdefault(delta.index, []).extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                finish[delta.index] = str(delta.finish_reason)
    return {"tokens": [tokens[i] for i in sorted(tokens)],
            "finish_reasons": [finish.get(i) for i in sorted(tokens)],
            "num_cached_tokens": num_cached}


def request(request_id: str, prompt: list[int], **params):
    from serving.backends.base import GenerationRequest
    from serving.engine.sampling_params import SamplingParams

    return GenerationRequest(request_id, prompt, SamplingParams(**params))


async def check_greedy(client, prompts: list[list[int]], num_logprobs: int
                       ) -> list[dict[str, Any]]:
    """Greedy tokens of every prompt, with each step's logprob and top candidates."""
    async def one(index: int, prompt: list[int]) -> dict[str, Any]:
        tokens, steps = [], []
        async for output in client.generate(request(
                f"greedy-{index}", prompt, temperature=0.0, max_tokens=GREEDY_MAX_TOKENS,
                logprobs=num_logprobs)):
            for delta in output.deltas:
                tokens.extend(delta.new_token_ids)
                steps.extend([lp.sampled_logprob, lp.top_logprobs]
                             for lp in delta.logprobs or [])
        return {"tokens": tokens, "logprobs": steps}

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def check_abort(client, prompt: list[int]) -> dict[str, Any]:
    """Leave a long request after two outputs: vLLM must drop it."""
    stream = client.generate(request("abort-me", prompt, temperature=0.0, max_tokens=400,
                                     ignore_eos=True))
    num_outputs = 0
    async for _ in stream:
        num_outputs += 1
        if num_outputs == 2:
            break
    await stream.aclose()
    deadline = time.monotonic() + 10
    while client.engine.get_num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return {"num_outputs": num_outputs, "client_unfinished": client.num_unfinished_requests,
            "vllm_unfinished": client.engine.get_num_unfinished_requests()}


async def check_abort_choice(client, prompt: list[int]) -> dict[str, Any]:
    """n=2; after the first output, end choice 0: it must stop while choice 1 goes on."""
    tokens: dict[int, list[int]] = {0: [], 1: []}
    reasons: dict[int, str] = {}
    num_at_abort = None
    async for output in client.generate(request("pair", prompt, n=2, temperature=1.0, seed=0,
                                                max_tokens=64, ignore_eos=True)):
        for delta in output.deltas:
            tokens[delta.index].extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                reasons[delta.index] = str(delta.finish_reason)
        if num_at_abort is None:
            num_at_abort = len(tokens[0])
            await client.abort_choice("pair", 0)
    deadline = time.monotonic() + 10
    while client.engine.get_num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return {"finish_reasons": [reasons.get(0), reasons.get(1)],
            "num_tokens": [len(tokens[0]), len(tokens[1])], "num_at_abort": num_at_abort,
            "client_unfinished": client.num_unfinished_requests,
            "vllm_unfinished": client.engine.get_num_unfinished_requests()}


async def check_errors(client, prompt: list[int]) -> dict[str, Any]:
    cases = {
        "too_long": request("too-long", prompt * 1000, max_tokens=4),
        "temperature": request("hot", prompt, temperature=5.0, max_tokens=4),
    }
    errors = {}
    for name, bad in cases.items():
        try:
            await collect(client, bad)
            errors[name] = None
        except Exception as exc:  # recorded for the test to judge
            errors[name] = {"type": type(exc).__name__, "param": getattr(exc, "param", None),
                            "message": str(exc)}
    return errors


async def check_structured(client, tokenizer, prompt: list[int]) -> dict[str, Any]:
    from serving.structured import GuideSpec

    formats = {"json_object": GuideSpec.json_object(),
               "json_schema": GuideSpec.json_schema(JSON_SCHEMA)}
    results = {}
    for name, guide in formats.items():
        result = await collect(client, request(f"json-{name}", prompt, guide=guide,
                                               temperature=0.0, max_tokens=48))
        results[name] = {"text": tokenizer.decode(result["tokens"][0], skip_special_tokens=True),
                         "finish_reason": result["finish_reasons"][0]}
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    from serving.backends import vllm as vllm_backend
    from serving.settings import ServerSettings

    prompts = json.loads(args.prompts)
    settings = ServerSettings(model=args.model, engine="vllm", dtype=args.dtype,
                              kv_cache_memory=1, max_num_seqs=8, max_model_len=512)
    start = time.perf_counter()
    client = vllm_backend.create(settings, CollectorRegistry())
    results: dict[str, Any] = {"ready_s": round(time.perf_counter() - start, 1),
                               "is_ready": client.is_ready,
                               "max_model_len": client.info.max_model_len,
                               "supports_structured_output":
                                   client.info.supports_structured_output}
    try:
        results["greedy"] = await check_greedy(client, prompts, args.greedy_logprobs)
        if args.greedy_only:
            return results
        results["n2"] = await collect(client, request("n2", prompts[0], n=2, temperature=1.0,
                                                      seed=0, max_tokens=8))
        results["logprobs"] = await check_logprobs(client, prompts[0])
        results["abort"] = await check_abort(client, prompts[0])
        results["abort_choice"] = await check_abort_choice(client, prompts[0])
        results["errors"] = await check_errors(client, prompts[0])
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        results["structured"] = await check_structured(client, tokenizer, prompts[0])
        results["metrics"] = client.metrics_text().decode()
    finally:
        await client.shutdown()
    return results


async def check_logprobs(client, prompt: list[int]) -> dict[str, Any]:
    outputs = []
    async for output in client.generate(request("lp", prompt, temperature=0.0, max_tokens=3,
                                                logprobs=2)):
        outputs.extend(lp for delta in output.deltas for lp in (delta.logprobs or []))
    return {"num": len(outputs),
            "top_sizes": [len(lp.top_logprobs) for lp in outputs],
            "sampled_is_top1": [lp.sampled_logprob == lp.top_logprobs[0][1] for lp in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--greedy-only", action="store_true")
    parser.add_argument("--greedy-logprobs", type=int, default=5,
                        help="top candidates recorded at every greedy step")
    results = asyncio.run(run(parser.parse_args()))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":  # vLLM spawns workers: keep start-up under the guard
    main()
