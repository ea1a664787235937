"""Measure a model dir or artifact: perplexity on held-out text, decode tokens/s, size.

The same code measures the baseline and every artifact (`quiver optimize eval` prints it as
JSON), so the manifest's numbers compare like with like:

- perplexity: each text (up to `max_tokens` tokens) scored in one forward pass, float32 on
  CPU, by the runtime that serves the artifact — our native model for safetensors and
  compressed-tensors (int8 / AWQ), ONNX Runtime for ONNX;
- decode tokens/s: greedy decoding of `decode_tokens` tokens at batch 1 through the serving
  engine (EOS ignored), after a warm-up;
- size: bytes of the weight files.
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

DEFAULT_MAX_TOKENS = 512
DEFAULT_DECODE_TOKENS = 64


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    eval_tokens: int
    size_bytes: int
    decode_tokens_per_s: float | None
    runtime: str

    def to_dict(self) -> dict:
        return asdict(self)


def artifact_format(model_dir: Path) -> str:
    manifest = Manifest.read(model_dir)
    if manifest is not None:
        return manifest.format
    if (Path(model_dir) / "genai_config.json").is_file():
        return "onnx"
    return "safetensors"


def evaluate(model_dir: Path, texts: TextSet, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             decode_tokens: int | None = DEFAULT_DECODE_TOKENS) -> EvalResult:
    fmt = artifact_format(model_dir)
    if fmt in ("onnx", "tensorrt"):
        from optimize.onnx_eval import onnx_decode_rate, onnx_perplexity

        ppl, count = onnx_perplexity(model_dir, texts.texts, max_tokens=max_tokens)
        rate = onnx_decode_rate(model_dir, decode_tokens) if decode_tokens else None
        runtime = "onnxruntime"
    else:
        ppl, count = native_perplexity(model_dir, texts.texts, max_tokens=max_tokens)
        rate = native_decode_rate(model_dir, decode_tokens) if decode_tokens else None
        runtime = "native"
    return EvalResult(perplexity=ppl, eval_tokens=count, size_bytes=size_bytes(model_dir),
                      decode_tokens_per_s=rate, runtime=runtime)


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


def native_decode_rate(model_dir: Path, decode_tokens: int, *, dtype: str = "auto",
                       batch_size: int = 1) -> float:
    """Output tokens/s of greedy decoding through the native engine (EOS ignored)."""
    from serving.engine import SamplingParams
    from serving.engine.factory import EngineSettings, build_engine

    engine = build_engine(EngineSettings(model=Path(model_dir), dtype=dtype,
                                         kv_cache_memory_gib=0.5,
                                         max_num_seqs=max(batch_size, 1)),
                          model_name="eval")

    async def one(prompt: list[int], tokens: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        produced = 0
        async for output in engine.generate(prompt, params, uuid.uuid4().hex):
            produced += sum(len(d.new_token_ids) for d in output.deltas)
        return produced

    async def run() -> float:
        prompts = [[1 + (i * 7 + j) % 50 for j in range(16)] for i in range(batch_size)]
        await asyncio.gather(*(one(p, 4) for p in prompts))          # warm-up
        start = time.perf_counter()
        produced = await asyncio.gather(*(one(p, decode_tokens) for p in prompts))
        return sum(produced) / (time.perf_counter() - start)

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()
