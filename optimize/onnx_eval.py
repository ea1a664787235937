"""Measure an ONNX artifact (onnxruntime-genai's layout: `genai_config.json`, `model.onnx`,
tokenizer files): full-sequence logits, perplexity, logit parity and decode tokens/s.

- logits / perplexity: one pass per text through a raw `onnxruntime.InferenceSession` on the
  decoder with an empty past KV cache (og's generator exposes only last-token logits), so
  every next-token prediction is exact; float64 log-softmax.
- greedy continuations (the task score, `optimize.tasks`): the same raw session, one prompt
  at a time, the KV cache fed back, EOS ignored;
- decode tokens/s: og's generator at batch 1, greedy, EOS suppressed (`min_length`), after
  a warm-up: the runtime that serves the artifact. A `tensorrt` artifact (which og cannot
  run) decodes in a raw ONNX Runtime loop on the TensorRT execution provider instead.

The session's execution providers follow the artifact: the TensorRT EP with the artifact's
engine cache for a `tensorrt` artifact, CUDA when the artifact was built for CUDA, else CPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.backends.onnx_config import import_og, tensorrt_provider_options

PROMPT_TOKENS = 16
WARMUP_TOKENS = 4
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_providers(model_dir: Path) -> list[Any]:
    """ONNX Runtime providers for the artifact, in priority order."""
    trt = tensorrt_provider_options(model_dir)
    if trt is not None:
        return [("TensorrtExecutionProvider", trt),
                ("CUDAExecutionProvider", {"device_id": trt["device_id"]}),
                "CPUExecutionProvider"]
    decoder = genai_config(model_dir)["model"]["decoder"]
    options = decoder.get("session_options", {}).get("provider_options", [])
    if any("cuda" in option for option in options):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def genai_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "genai_config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} is not an ONNX artifact (no genai_config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class OnnxDecoder:
    """The artifact's decoder graph under a raw InferenceSession, batch 1."""

    session: Any
    past_names: list[tuple[str, str]]
    present_names: list[tuple[str, str]]
    kv_shape: tuple[int, int]  # (num_key_value_heads, head_size)
    kv_dtype: Any

    @classmethod
    def load(cls, model_dir: Path, providers: list[Any] | None = None) -> OnnxDecoder:
        import onnxruntime as ort

        decoder = genai_config(model_dir)["model"]["decoder"]
        session = ort.InferenceSession(str(Path(model_dir) / decoder["filename"]),
                                       providers=providers or session_providers(model_dir))
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        layers = range(decoder["num_hidden_layers"])
        past = [(inputs["past_key_names"] % i, inputs["past_value_names"] % i) for i in layers]
        present = [(outputs["present_key_names"] % i, outputs["present_value_names"] % i)
                   for i in layers]
        types = {item.name: item.type for item in session.get_inputs()}
        return cls(session, past, present,
                   (decoder["num_key_value_heads"], decoder["head_size"]),
                   ORT_DTYPES[types[past[0][0]]])

    def empty_past(self) -> dict[str, np.ndarray]:
        empty = np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.kv_dtype)
        return {name: empty for pair in self.past_names for name in pair}

    def run(self, ids: list[int], past: dict[str, np.ndarray],
            num_past: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits [len(ids), vocab] (float32) and the next step's past."""
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, num_past + len(ids)), dtype=np.int64), **past}
        names = ["logits"] + [name for pair in self.present_names for name in pair]
        logits, *present = self.session.run(names, feeds)
        past_names = [name for pair in self.past_names for name in pair]
        return logits[0].astype(np.float32), dict(zip(past_names, present, strict=True))

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.run(ids, self.empty_past(), 0)[0]

    def greedy(self, prompt: list[int], num_tokens: int) -> list[int]:
        """Greedy decoding with the KV cache fed back, EOS ignored."""
        ids, past, num_past, output = prompt, self.empty_past(), 0, []
        for _ in range(num_tokens):
            logits, past = self.run(ids, past, num_past)
            num_past += len(ids)
            ids = [int(logits[-1].argmax())]
            output += ids
        return output


def onnx_logits(model_dir: Path, ids_list: list[list[int]],
                providers: list[Any] | None = None) -> list[np.ndarray]:
    decoder = OnnxDecoder.load(model_dir, providers)
    return [decoder.logits(ids) for ids in ids_list]


def torch_logits(model_dir: Path, ids_list: list[list[int]]) -> list[np.ndarray]:
    """The reference: Hugging Face transformers, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in ids_list]


def max_abs_diff(left: list[np.ndarray], right: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(left, right, strict=True))


def nll_sum(logits: np.ndarray, ids: list[int]) -> float:
    """Summed next-token negative log-likelihood of `ids[1:]` (float64)."""
    scores = logits[:-1].astype(np.float64)
    peak = scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(scores - peak).sum(axis=-1)) + peak[:, 0]
    targets = np.asarray(ids[1:])
    return float((log_norm - scores[np.arange(len(targets)), targets]).sum())


def onnx_perplexity(model_dir: Path, texts: list[str], *,
                    max_tokens: int = 512) -> tuple[float, int]:
    """exp(mean NLL) over every next-token prediction of every text (up to `max_tokens`)."""
    from optimize.data import token_ids

    decoder = OnnxDecoder.load(model_dir)
    total_nll, count = 0.0, 0
    for ids in token_ids(model_dir, texts, max_tokens):
        total_nll += nll_sum(decoder.logits(ids), ids)
        count += len(ids) - 1
    if count == 0:
        raise ValueError("no evaluation text with at least two tokens")
    return math.exp(total_nll / count), count


def onnx_greedy(model_dir: Path, prompts: list[list[int]],
                num_tokens: list[int]) -> list[list[int]]:
    """Greedy continuations (EOS ignored) of every prompt, on the artifact's providers."""
    decoder = OnnxDecoder.load(model_dir)
    return [decoder.greedy(prompt, count)
            for prompt, count in zip(prompts, num_tokens, strict=True)]


def _prompt() -> list[int]:
    return [1 + j % 50 for j in range(PROMPT_TOKENS)]


def onnx_decode_rate(model_dir: Path, decode_tokens: int) -> float:
    """Output tokens/s of greedy decoding at batch 1 (EOS ignored), after a warm-up."""
    if tensorrt_provider_options(model_dir) is not None:
        return _raw_decode_rate(model_dir, decode_tokens)
    og = import_og()
    model = og.Model(og.Config(str(model_dir)))
    prompt = np.asarray([_prompt()], dtype=np.int32)

    def decode(num_tokens: int) -> int:
        length = PROMPT_TOKENS + num_tokens
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return len(generator.get_sequence(0)) - PROMPT_TOKENS

    decode(WARMUP_TOKENS)
    start = time.perf_counter()
    produced = decode(decode_tokens)
    return produced / (time.perf_counter() - start)


def _raw_decode_rate(model_dir: Path, decode_tokens: int) -> float:
    decoder = OnnxDecoder.load(model_dir)
    decoder.greedy(_prompt(), WARMUP_TOKENS)
    start = time.perf_counter()
    produced = len(decoder.greedy(_prompt(), decode_tokens))
    return produced / (time.perf_counter() - start)
