"""What onnxruntime-genai needs for a Quiver request: the artifact's config, a config view
with EOS handled by us, request checks (what og cannot do is refused by name), and the
per-request og options. Split from `onnx.py`, which runs og's engine loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.backends.base import GenerationRequest
from serving.engine.errors import InvalidRequestError, PromptTooLongError
from serving.engine.sampling_params import SamplingParams

INSTALL_HINT = "the onnx engine needs quiver[optimize] (onnxruntime, onnxruntime-genai)"
# Written by `quiver optimize tensorrt` next to the ONNX model: ONNX Runtime's TensorRT
# execution provider settings, the engine cache path relative to the artifact dir.
TENSORRT_CONFIG = "tensorrt.json"


def import_og() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})", name=exc.name or "og") from exc
    return og


@dataclass(frozen=True)
class OnnxModelConfig:
    """What the client needs from `genai_config.json`."""

    eos_token_ids: tuple[int, ...]
    context_length: int
    is_paged: bool  # built for og's continuous-batching (dynamic) engine

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> OnnxModelConfig:
        path = Path(model_dir) / "genai_config.json"
        if not path.is_file():
            raise ValueError(f"model {model_dir} is not an onnxruntime-genai artifact (no "
                             "genai_config.json): build one with `quiver optimize onnx`")
        config = json.loads(path.read_text(encoding="utf-8"))
        eos = config["model"].get("eos_token_id", [])
        return cls(eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
                   context_length=int(config["model"]["context_length"]),
                   is_paged="dynamic_batching" in config.get("engine", {}))


def tensorrt_provider_options(model_dir: Path) -> dict[str, Any] | None:
    """ONNX Runtime's TensorrtExecutionProvider options for a `tensorrt` artifact (engine
    and timing caches inside it), or None for a plain ONNX artifact."""
    path = Path(model_dir) / TENSORRT_CONFIG
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    cache = str((Path(model_dir) / config["engine_cache"]).resolve())
    return {"device_id": int(config.get("device_id", 0)),
            "trt_fp16_enable": config.get("precision") == "fp16",
            "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}


def check_servable(og: Any, model_dir: Path, device: str) -> None:
    """A `tensorrt` artifact's engines need ONNX Runtime's TensorRT EP, which og cannot
    attach (its providers: CUDA, NvTensorRtRtx, DML, QNN, OpenVINO, WebGPU, ...); serving
    its ONNX graph on CUDA, engines unused, must be asked for with --device cuda."""
    if tensorrt_provider_options(model_dir) is None or device in ("cpu", "cuda"):
        return
    raise ValueError(f"model {model_dir} is a tensorrt artifact: its engines run on ONNX "
                     "Runtime's TensorRT execution provider, which onnxruntime-genai "
                     f"{og.__version__} cannot attach; pass --device cuda to serve its ONNX "
                     "graph on the CUDA execution provider (engines unused)")


def og_config_view(og: Any, model_dir: Path, config: OnnxModelConfig, view: Path, *,
                   device: str, max_len: int, max_batch_size: int) -> Any:
    """og's config over `view`: symlinks to the artifact's files and our own
    genai_config.json (og's overlay cannot empty a list) with no EOS id, our length limit
    and batch size."""
    check_servable(og, model_dir, device)
    genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    genai["model"]["eos_token_id"] = []
    genai["search"]["max_length"] = max_len
    if not config.is_paged:
        genai.setdefault("engine", {})["static_batching"] = {"max_batch_size": max_batch_size}
    for path in model_dir.iterdir():
        if path.name != "genai_config.json":
            (view / path.name).symlink_to(path.resolve())
    (view / "genai_config.json").write_text(json.dumps(genai), encoding="utf-8")
    og_config = og.Config(str(view))
    if device in ("cpu", "cuda"):
        og_config.clear_providers()
    if device == "cuda":
        og_config.append_provider("cuda")
    return og_config


def check_request(request: GenerationRequest, max_len: int) -> None:
    """Reject what og cannot do (rather than ignoring it) and prompts that do not fit."""
    params, num_prompt_tokens = request.params, len(request.prompt_token_ids)
    if num_prompt_tokens == 0:
        raise InvalidRequestError("the prompt must have at least one token", param="prompt")
    if num_prompt_tokens >= max_len or (
            params.max_tokens is not None and num_prompt_tokens + params.max_tokens > max_len):
        raise PromptTooLongError(num_prompt_tokens, params.max_tokens, max_len)
    unsupported = [("logprobs", params.logprobs is not None),
                   ("presence_penalty", params.presence_penalty != 0),
                   ("frequency_penalty", params.frequency_penalty != 0),
                   ("min_p", params.min_p != 0),
                   ("seed", params.seed is not None and not params.is_greedy),
                   ("logit_bias", bool(params.logit_bias))]
    for param, is_set in unsupported:
        if is_set:
            raise InvalidRequestError(f"{param} is not supported by the onnx engine "
                                      "(onnxruntime-genai): serve with --engine native or vllm",
                                      param=param)


def guidance(params: SamplingParams) -> tuple[str, str] | None:
    """The request's guide as og's guidance (llguidance): JSON schemas and regular
    expressions; a choice becomes a regex. EBNF grammars and tool-call formats are refused
    (llguidance reads Lark, not xgrammar's EBNF), naming the field they came from."""
    guide = params.guide
    if guide is None:
        return None
    if guide.kind == "json_object":
        return "json_schema", json.dumps({"type": "object"})
    if guide.kind == "json_schema":
        return "json_schema", guide.value
    if guide.kind == "regex":
        return "regex", guide.value
    if guide.kind == "choice":
        return "regex", "|".join(re.escape(choice) for choice in json.loads(guide.value))
    what = "forced tool calls" if guide.kind == "structural_tag" else "EBNF grammars"
    raise InvalidRequestError(f"the onnx engine has no {what}: serve with --engine native or "
                              "vllm", param=guide.param)


def turn_options(og: Any, og_request: Any, params: SamplingParams, max_tokens: int,
                 guide: tuple[str, str] | None) -> Any:
    options = og.TurnOptions(og_request)
    options.set_max_generated_tokens(max_tokens)
    if params.is_greedy:
        options.set_do_sample(False)
        options.set_temperature(0.0)
    else:
        options.set_do_sample(True)
        options.set_temperature(params.temperature)
        options.set_top_p(params.top_p)
        options.set_top_k(max(params.top_k, 0))  # 0 disables (genai_config's default is 50)
    if params.repetition_penalty != 1.0:
        options.set_repetition_penalty(params.repetition_penalty)
    if guide is not None:
        options.set_guidance(*guide)
    return options
