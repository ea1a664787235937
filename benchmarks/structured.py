"""Structured-output benchmark: what constraining half a batch to a JSON schema costs.

    python benchmarks/structured.py [--model models/smollm2-135m-instruct] [--concurrency 32]
                                    [--rounds 3] [--output-tokens 128]

One `quiver serve` (native engine, `--dtype auto`) on SmolLM2; per round, one after the
other: `--concurrency` free chat requests, then the same number with every other one
constrained by `response_format: json_schema`. Every request generates exactly
`--output-tokens` tokens (`ignore_eos`: once a constrained answer's JSON is complete its
grammar allows only EOS, which keeps the mask working on every step), streamed through the
OpenAI API. Reported: output tokens/s of each batch (median over rounds), their ratio
(target >= 0.8), and the share of constrained answers that parse and validate (target 100 %).
Results go to benchmarks/results/structured.json; the CPU's flags are named in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_RATIO = 0.8
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "city": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
TOPICS = ["a sailor", "a teacher", "a painter", "a farmer", "a pilot", "a chef", "a doctor",
          "a poet"]


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return sorted(flag for flag in line.split(":")[-1].split()
                  if flag.startswith(("avx2", "avx512f", "avx512_bf16", "amx")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver", "serve", "--model", str(model), "--port", str(port),
         "--served-model-name", "bench", "--max-num-seqs", "64"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"quiver serve exited with {process.returncode}")
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("quiver serve was not ready within 600 s")


def body(index: int, constrained: bool, output_tokens: int) -> dict:
    request = {"model": "bench", "stream": True, "max_tokens": output_tokens,
               "temperature": 0, "ignore_eos": True,
               "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content":
                             f"Describe {TOPICS[index % len(TOPICS)]} (request {index})."}]}
    if constrained:
        request["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "person", "schema": SCHEMA, "strict": True}}
    return request


async def one(client: httpx.AsyncClient, url: str, request: dict) -> tuple[int, str]:
    tokens, text = 0, ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=request) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
    return tokens, text


async def batch(url: str, concurrency: int, output_tokens: int, *,
                constrained: bool) -> tuple[float, list[str]]:
    requests = [body(i, constrained and i % 2 == 0, output_tokens) for i in range(concurrency)]
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, r) for r in requests))
        seconds = time.perf_counter() - started
    texts = [text for (_, text), r in zip(results, requests, strict=True)
             if "response_format" in r]
    return sum(tokens for tokens, _ in results) / seconds, texts


def is_valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args.model, port)
    try:
        asyncio.run(batch(url, 4, 16, constrained=True))  # warm-up: compile paths, grammars
        free, mixed, answers = [], [], []
        for _ in range(args.rounds):
            free.append(asyncio.run(batch(url, args.concurrency, args.output_tokens,
                                          constrained=False))[0])
            rate, texts = asyncio.run(batch(url, args.concurrency, args.output_tokens,
                                            constrained=True))
            mixed.append(rate)
            answers += texts
    finally:
        process.terminate()
        process.wait(60)
    summary = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_flags": cpu_flags(), "model": str(args.model), "concurrency": args.concurrency,
        "output_tokens": args.output_tokens, "free_tok_s": [round(r, 1) for r in free],
        "half_constrained_tok_s": [round(r, 1) for r in mixed],
        "ratio": round(statistics.median(mixed) / statistics.median(free), 3),
        "target_ratio": TARGET_RATIO,
        "valid_share": round(sum(map(is_valid, answers)) / len(answers), 3),
        "num_constrained_answers": len(answers),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["ratio"] >= TARGET_RATIO and summary["valid_share"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
