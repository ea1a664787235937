"""The measurements of `benchmarks/optimize.py`, one per process: `optimize.py --worker JSON`
runs `work(task)` here and prints its result as one `RESULT {...}` line.

Tasks: `ppl` (perplexity on the held-out passages, `optimize.evaluate`), `decode` (tokens/s
through the serving engine at a batch size: the native engine, or our onnx engine for an
ONNX artifact, measured alike: same prompts, a warm-up, greedy, EOS ignored) and
`distill_probe` (seconds per training step of the default half-depth student, KD and CE).
"""

from __future__ import annotations

import time
from pathlib import Path


def work(task: dict) -> dict:
    kind, model_dir = task["task"], Path(task.get("dir", "."))
    if kind == "ppl":
        from optimize.data import load_texts
        from optimize.evaluate import evaluate

        texts = load_texts(None, "evaluation", limit=task["samples"])
        result = evaluate(model_dir, texts, max_tokens=task["max_tokens"], decode_tokens=None)
        return {"perplexity": result.perplexity, "eval_tokens": result.eval_tokens,
                "runtime": result.runtime}
    if kind == "decode":
        return decode_task(model_dir, task)
    if kind == "distill_probe":
        return distill_probe(model_dir, task)
    raise ValueError(f"unknown worker task {kind!r}")


def decode_task(model_dir: Path, task: dict) -> dict:
    from optimize.evaluate import artifact_format, native_decode_rate

    batch, tokens = task["batch"], task["tokens"]
    if artifact_format(model_dir) in ("onnx", "tensorrt"):
        return {"tokens_per_s": onnx_engine_rate(model_dir, tokens, batch), "engine": "onnx",
                "dtype": "artifact"}
    import torch

    from serving.engine.factory import model_dtype

    try:
        dtype = str(model_dtype(model_dir, task["dtype"], torch.device("cpu")))
    except Exception as exc:  # noqa: BLE001 - informative only; the rate decides
        dtype = f"{task['dtype']} (unresolved: {exc})"
    rate = native_decode_rate(model_dir, tokens, dtype=task["dtype"], batch_size=batch)
    return {"tokens_per_s": rate, "engine": "native", "dtype": dtype.removeprefix("torch.")}


def onnx_engine_rate(model_dir: Path, decode_tokens: int, batch_size: int) -> float:
    """Output tokens/s through our onnx serving engine, measured as `native_decode_rate`
    measures the native one (same prompts, warm-up, greedy, EOS ignored)."""
    import asyncio
    import uuid

    from prometheus_client import CollectorRegistry

    from serving.backends.base import GenerationRequest
    from serving.backends.onnx import OnnxEngineClient
    from serving.engine import SamplingParams

    client = OnnxEngineClient(model_dir, served_model_name="bench", registry=CollectorRegistry(),
                              max_num_seqs=max(batch_size, 1))

    async def one(prompt: list[int], tokens: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        produced = 0
        async for output in client.generate(GenerationRequest(uuid.uuid4().hex, prompt, params)):
            produced += sum(len(d.new_token_ids) for d in output.deltas)
        return produced

    async def run() -> float:
        try:
            prompts = [[1 + (i * 7 + j) % 50 for j in range(16)] for i in range(batch_size)]
            await asyncio.gather(*(one(p, 4) for p in prompts))
            start = time.perf_counter()
            produced = await asyncio.gather(*(one(p, decode_tokens) for p in prompts))
            return sum(produced) / (time.perf_counter() - start)
        finally:
            await client.shutdown()

    return asyncio.run(run())


def distill_probe(model_dir: Path, task: dict) -> dict:
    """Seconds per training step of the default half-depth student, KD and CE-only."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimize.distill_train import TrainSettings, make_optimizer, train_step
    from optimize.methods.distill import make_student, parse_layer_map

    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    layers = parse_layer_map(None, teacher.config.num_hidden_layers, None)
    settings = TrainSettings()
    ids = torch.randint(0, teacher.config.vocab_size, (settings.batch_size, settings.seq_len))
    result = {}
    for kind, kd_teacher in (("kd", teacher), ("ce", None)):
        student = make_student(teacher, layers).train()
        optimizer = make_optimizer(student, settings)
        train_step(kd_teacher, student, optimizer, ids, 0, settings)     # warm-up
        start = time.perf_counter()
        for step in range(1, task["steps"] + 1):
            train_step(kd_teacher, student, optimizer, ids, step, settings)
        result[f"{kind}_step_s"] = (time.perf_counter() - start) / task["steps"]
    return result
