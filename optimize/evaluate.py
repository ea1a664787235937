"""Measure a model dir or artifact: perplexity on held-out text, decode tokens/s, size.

The same code measures the baseline and every artifact (`quiver optimize eval` prints it as
JSON), so the manifest's numbers compare like with like:

- perplexity: each text (up to `max_tokens` tokens) scored in one forward pass, float32 on
  CPU, by the runtime that serves the artifact — our native model for safetensors and
  compressed-tensors (int8 / AWQ), ONNX Runtime for ONNX;
- decode tokens/s: greedy decoding of `decode_tokens` tokens at batch 1 through the serving
  engine (EOS ignored), after a warm-up;
- size: bytes of the weight files;
- task score (`optimize.tasks`, when a suite is given): greedy answers to the suite's
  requests, all in one batch, by the same runtime as perplexity and in the same precision
  (float32 on the native engine, so the score shows the method and not the host's bf16).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from optimize.data import TextSet, token_ids
from optimize.manifest import Manifest, size_bytes
from optimize.tasks import TaskResult, TaskSuite, score

DEFAULT_MAX_TOKENS = 512
DEFAULT_DECODE_TOKENS = 64


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    eval_tokens: int
    size_bytes: int
    decode_tokens_per_s: float | None
    runtime: str
    tasks: TaskResult | None = None

    def to_dict(self) -> dict:
        """The measurements (the task answers are compared by `TaskComparison`)."""
        return {key: value for key, value in asdict(self).items() if key != "tasks"}


def artifact_format(model_dir: Path) -> str:
    manifest = Manifest.read(model_dir)
    if manifest is not None:
        return manifest.format
    if (Path(model_dir) / "genai_config.json").is_file():
        return "onnx"
    return "safetensors"


def evaluate(model_dir: Path, texts: TextSet, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             decode_tokens: int | None = DEFAULT_DECODE_TOKENS,
             suite: TaskSuite | None = None) -> EvalResult:
    if is_onnx(model_dir):
        from optimize.onnx_eval import onnx_decode_rate, onnx_perplexity

        ppl, count = onnx_perplexity(model_dir, texts.texts, max_tokens=max_tokens)
        rate = onnx_decode_rate(model_dir, decode_tokens) if decode_tokens else None
        runtime = "onnxruntime"
    else:
        ppl, count = native_perplexity(model_dir, texts.texts, max_tokens=max_tokens)
        rate = native_decode_rate(model_dir, decode_tokens) if decode_tokens else None
        runtime = "native"
    tasks = run_tasks(model_dir, suite) if suite is not None else None
    return EvalResult(perplexity=ppl, eval_tokens=count, size_bytes=size_bytes(model_dir),
                      decode_tokens_per_s=rate, runtime=runtime, tasks=tasks)


def is_onnx(model_dir: Path) -> bool:
    """Served by ONNX Runtime (an `onnx` or `tensorrt` artifact), else by the native engine."""
    return artifact_format(model_dir) in ("onnx", "tensorrt")


def run_tasks(model_dir: Path, suite: TaskSuite) -> TaskResult:
    """The model's greedy answers to every request of `suite`, scored."""
    prompts, lengths = suite.requests()
    if is_onnx(model_dir):
        from optimize.onnx_eval import onnx_greedy

        outputs = onnx_greedy(model_dir, prompts, lengths)
    else:
        outputs = native_greedy(model_dir, prompts, lengths)
    return score(suite, outputs)


def native_perplexity(model_dir: Path, texts: list[str], *,
                      max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[float, int]:
    """exp(mean NLL) over every next-token prediction of every text, native model, fp32."""
    import torch
    import torch.nn.functional as F

    from serving.models.attention import AttentionMetadata
    from serving.models.loader import load_model

    block_size = 16
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    kv_caches = model.make_kv_caches(math.ceil(max_tokens / block_size), block_size)
    total_nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in token_ids(model_dir, texts, max_tokens):
            length = len(ids)
            positions = torch.arange(length)
            metadata = AttentionMetadata.build(
                query_lens=[length], seq_lens=[length],
                block_tables=[list(range(math.ceil(length / block_size)))],
                block_size=block_size)
            hidden = model(torch.tensor(ids), positions, kv_caches, metadata)
            logits = model.compute_logits(hidden[:-1])
            total_nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            count += length - 1
    if count == 0:
        raise ValueError("no evaluation text with at least two tokens")
    return math.exp(total_nll / count), count


async def _generate(engine, prompt: list[int], num_tokens: int) -> list[int]:
    """One greedy request through a native engine, EOS ignored: its token ids."""
    from serving.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    produced: list[int] = []
    async for output in engine.generate(prompt, params, uuid.uuid4().hex):
        for delta in output.deltas:
            produced.extend(delta.new_token_ids)
    return produced


def native_greedy(model_dir: Path, prompts: list[list[int]],
                  num_tokens: list[int]) -> list[list[int]]:
    """Greedy continuations (EOS ignored) of every prompt, all submitted at once to one
    native engine, float32, with a KV cache sized to hold them all."""
    from serving.engine.factory import EngineSettings, build_engine
    from serving.models.config import ModelArchConfig

    arch = ModelArchConfig.from_model_dir(Path(model_dir))
    token_bytes = 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * 4
    num_slots = sum(len(p) + n for p, n in zip(prompts, num_tokens, strict=True))
    kv_gib = max(2 * num_slots * token_bytes / (1 << 30), 1 / 16)
    engine = build_engine(EngineSettings(model=Path(model_dir), dtype="float32",
                                         kv_cache_memory_gib=kv_gib,
                                         max_num_seqs=min(max(len(prompts), 1), 128)),
                          model_name="eval")

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(
            *(_generate(engine, p, n) for p, n in zip(prompts, num_tokens, strict=True))))

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def native_decode_rate(model_dir: Path, decode_tokens: int, *, dtype: str = "auto",
                       batch_size: int = 1) -> float:
    """Output tokens/s of greedy decoding through the native engine (EOS ignored)."""
    from serving.engine.factory import EngineSettings, build_engine

    engine = build_engine(EngineSettings(model=Path(model_dir), dtype=dtype,
                                         kv_cache_memory_gib=0.5,
                                         max_num_seqs=max(batch_size, 1)),
                          model_name="eval")

    async def run() -> float:
        prompts = [[1 + (i * 7 + j) % 50 for j in range(16)] for i in range(batch_size)]
        await asyncio.gather(*(_generate(engine, p, 4) for p in prompts))     # warm-up
        start = time.perf_counter()
        produced = await asyncio.gather(*(_generate(engine, p, decode_tokens)
                                          for p in prompts))
        return sum(map(len, produced)) / (time.perf_counter() - start)

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()
