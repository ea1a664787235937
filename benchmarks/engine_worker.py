"""One engine under load, in its own process: `python benchmarks/engine_worker.py ENGINE ...`.

Run by `benchmarks/engine.py` with the interpreter that has the engine installed (vLLM lives
in .venv-vllm). Prints one JSON object on the last line of stdout: time-to-ready (from
process start, imports included) and, per concurrency level, output tokens/s and
TTFT / inter-token latency percentiles. Workload: distinct prompts of exactly
`--prompt-tokens` tokens cut from local text, `--output-tokens` tokens each, EOS ignored.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402


@dataclass
class RequestTrace:
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class LevelResult:
    concurrency: int
    num_requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(concurrency: int, traces: list[RequestTrace], seconds: float) -> LevelResult:
    tokens = sum(len(t.token_times) for t in traces)
    ttfts = [t.ttft for t in traces]
    itls = [x for t in traces for x in t.itls] or [0.0]
    return LevelResult(concurrency, len(traces), tokens, round(seconds, 3),
                       round(tokens / seconds, 2), round(percentile(ttfts, 50) * 1e3, 1),
                       round(percentile(ttfts, 95) * 1e3, 1), round(percentile(itls, 50) * 1e3, 2),
                       round(percentile(itls, 95) * 1e3, 2))


def make_prompts(tokenizer, num: int, num_tokens: int) -> list[list[int]]:
    """Distinct prompts of exactly num_tokens tokens from Python's bundled docs."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(text for _, text in sorted(topics.items())))["input_ids"]
    stride = max(1, (len(ids) - num_tokens) // max(1, num))
    return [ids[i * stride: i * stride + num_tokens] for i in range(num)]


async def run_level(generate, prompts: list[list[int]], output_tokens: int):
    traces = [RequestTrace(0.0) for _ in prompts]

    async def one(index: int, prompt: list[int]) -> None:
        traces[index].start = time.perf_counter()
        async for num_new in generate(prompt, output_tokens):
            now = time.perf_counter()
            traces[index].token_times.extend([now] * num_new)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - start, traces


# -- engines: each returns (generate, shutdown) once ready ----------------------------------

def native_engine(args):
    from prometheus_client import CollectorRegistry

    from serving.engine import SamplingParams
    from serving.engine.factory import EngineSettings, build_engine

    engine = build_engine(EngineSettings(model=args.model, dtype=args.dtype,
                                         max_num_seqs=max(args.concurrency)),
                          model_name="bench", registry=CollectorRegistry())

    async def generate(prompt, output_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
        async for output in engine.generate(prompt, params, uuid.uuid4().hex):
            yield sum(len(d.new_token_ids) for d in output.deltas)

    return generate, engine.shutdown


def vllm_engine(args):
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(args.model), dtype=args.dtype, enforce_eager=True,
        max_num_seqs=max(args.concurrency), disable_log_stats=True))

    async def generate(prompt, output_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                            request_id=uuid.uuid4().hex):
            yield len(output.outputs[0].token_ids)

    return generate, engine.shutdown


def hf_engine(args):
    """Hugging Face `generate`, one request at a time (a lock serialises them)."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(args.dtype, "auto")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    lock = threading.Lock()

    def run(prompt, output_tokens, emit):
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                emit(int(value.numel()))

            def end(self):
                pass

        with lock, torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=output_tokens,
                           min_new_tokens=output_tokens, do_sample=False, streamer=Streamer())

    async def generate(prompt, output_tokens):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        task = loop.run_in_executor(None, run, prompt, output_tokens,
                                    lambda n: loop.call_soon_threadsafe(queue.put_nowait, n))
        received = 0
        while received < output_tokens:
            n = await queue.get()
            received += n
            yield n
        await task

    return generate, lambda: None


ENGINES = {"native": native_engine, "vllm": vllm_engine, "hf": hf_engine}


async def main_async(args) -> dict:
    from transformers import AutoTokenizer

    generate, shutdown = ENGINES[args.engine](args)
    ready_s = time.perf_counter() - PROCESS_START
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    levels = []
    try:
        warm = make_prompts(tokenizer, 1, args.prompt_tokens)
        await run_level(generate, warm, 8)
        for concurrency in args.concurrency:
            num = args.requests or concurrency
            prompts = make_prompts(tokenizer, num, args.prompt_tokens)
            seconds, traces = await run_level(generate, prompts[:concurrency], args.output_tokens)
            levels.append(asdict(summarize(concurrency, traces, seconds)))
            print(f"# {args.engine} c={concurrency}: {levels[-1]['tokens_per_s']} tok/s",
                  file=sys.stderr, flush=True)
    finally:
        shutdown()
    return {"engine": args.engine, "ready_s": round(ready_s, 2), "levels": levels,
            "python": sys.executable, "threads": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default: the concurrency)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
