"""Streaming load on an OpenAI-compatible server: N concurrent `/v1/completions` streams.

Every request sends its prompt as token ids (so both servers see exactly the same tokens),
asks for `output_tokens` tokens greedily with EOS ignored, and streams the answer with
`stream_options.include_usage`. Output tokens are counted from the final usage chunk (the
server's own count), so a server that packs several tokens into one chunk is not short-
changed; chunk arrival times give TTFT and inter-chunk latency.

The client is plain asyncio + aiohttp, one connection per stream, parsing only the `data:`
lines it needs: it costs the same CPU against every server it drives.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


@dataclass(frozen=True)
class Workload:
    """What every request of a level asks for."""

    model_name: str
    prompts: list[list[int]]
    output_tokens: int


@dataclass
class StreamTrace:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level: every stream started at once, timed until the last ends."""

    concurrency: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float


def make_prompts(tokenizer_dir: Path, num: int, num_tokens: int) -> list[list[int]]:
    """`num` distinct prompts of exactly `num_tokens` tokens cut from Python's bundled docs
    (real English that every machine has), so no two share a cached prefix."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    text = "\n\n".join(body for _, body in sorted(topics.items()))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stride = max(1, (len(ids) - num_tokens) // max(1, num))
    return [ids[i * stride : i * stride + num_tokens] for i in range(num)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(concurrency: int, traces: list[StreamTrace], seconds: float) -> LevelResult:
    tokens = sum(trace.completion_tokens for trace in traces)
    ttfts = [trace.ttft for trace in traces]
    gaps = [gap for trace in traces for gap in trace.gaps]
    return LevelResult(
        concurrency=concurrency,
        output_tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 2),
        ttft_p50_ms=round(percentile(ttfts, 50) * 1e3, 1),
        ttft_p95_ms=round(percentile(ttfts, 95) * 1e3, 1),
        itl_p50_ms=round(percentile(gaps, 50) * 1e3, 2),
        itl_p95_ms=round(percentile(gaps, 95) * 1e3, 2),
    )


def request_body(workload: Workload, prompt: list[int]) -> dict:
    return {
        "model": workload.model_name,
        "prompt": prompt,
        "max_tokens": workload.output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict) -> StreamTrace:
    """POST one streamed completion; raise on an HTTP error or a stream without usage."""
    trace = StreamTrace(time.perf_counter())
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:500]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices"):
                trace.chunk_times.append(time.perf_counter())
                trace.text += chunk["choices"][0].get("text") or ""
            if chunk.get("usage"):
                trace.completion_tokens = chunk["usage"]["completion_tokens"]
    if not trace.completion_tokens or not trace.chunk_times:
        raise RuntimeError(f"stream from {url} ended without tokens or usage")
    return trace


async def run_level(url: str, workload: Workload) -> tuple[LevelResult, list[StreamTrace]]:
    """Start one stream per prompt at once; time until the last one ends."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        traces = await asyncio.gather(
            *(stream_one(session, url, request_body(workload, prompt))
              for prompt in workload.prompts)
        )
        seconds = time.perf_counter() - start
    return summarize(len(workload.prompts), list(traces), seconds), list(traces)
