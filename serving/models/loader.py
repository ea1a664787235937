"""Load a Llama-family HF safetensors checkpoint into `LlamaForCausalLM`.

Reads `model.safetensors`, or the shards named by `model.safetensors.index.json`, and fuses
q/k/v and gate/up into one weight each while copying into the model's parameters.

A compressed-tensors `pack-quantized` checkpoint (`quantization_config` in config.json, what
`quiver optimize int8|awq` and llmcompressor write) loads too: each quantized Linear's
`weight_packed` / `weight_scale` / `weight_shape` (/ `weight_zero_point`) become a
low-bit projection (`serving.models.quant`), fused along rows like float weights. Layers the
recipe ignored stay float; embeddings and the LM head are always float.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from serving.kernels import REFERENCE_ATTENTION, AttentionOp
from serving.models.compressed import QuantizationConfig, cat_rows, read_quantized
from serving.models.config import ModelArchConfig
from serving.models.linear import Packing
from serving.models.llama import LlamaForCausalLM
from serving.models.quant import FloatProjection, Projection, make_projection

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(dtype: torch.dtype | str, arch: ModelArchConfig) -> torch.dtype:
    """`"auto"` is the checkpoint's dtype; names like `"bfloat16"` are accepted too."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return arch.dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name or 'auto'")
    return resolved


def load_model(
    model_dir: Path,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "cpu",
    max_model_len: int | None = None,
    attention_op: AttentionOp = REFERENCE_ATTENTION,
    packing: Packing = Packing.EAGER,
) -> LlamaForCausalLM:
    """Our model with every weight of `model_dir`; quantized projections keep low-bit kernels.
    `attention_op`: the paged-attention op its layers call (`serving.kernels`); `packing`:
    how float weights are held for their GEMMs (`serving.models.linear`)."""
    model_dir = Path(model_dir)
    arch = ModelArchConfig.from_model_dir(model_dir)
    quantization = QuantizationConfig.from_model_dir(model_dir)
    model = LlamaForCausalLM(
        arch, dtype=resolve_dtype(dtype, arch), device=device, max_model_len=max_model_len,
        attention_op=attention_op,
    )
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(path, "pt")) for path in _shard_paths(model_dir)]
        reader = _Reader(model_dir, {name: h for h in handles for name in h.keys()})  # noqa: SIM118
        with torch.no_grad():
            for parameter, source_names in _parameter_sources(model):
                _copy_fused(parameter, [reader(name) for name in source_names], source_names)
            for owner, attribute, module_names in _projection_sources(model):
                _load_projection(owner, attribute, module_names, reader, quantization)
    model.prepack(packing)
    _log_kernels(model_dir, model)
    return model.eval()


class _Reader:
    """Tensors by name across the checkpoint's shards."""

    def __init__(self, model_dir: Path, handles: dict[str, Any]) -> None:
        self.model_dir = model_dir
        self.handles = handles

    def __contains__(self, name: str) -> bool:
        return name in self.handles

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.handles:
            if name.endswith(".weight") and f"{name}_packed" in self.handles:
                raise ValueError(
                    f"checkpoint {self.model_dir} quantizes {name.removesuffix('.weight')!r}; "
                    "only decoder projections may be quantized (ignore it in the recipe)"
                )
            raise ValueError(f"checkpoint {self.model_dir} is missing tensor {name!r}")
        return self.handles[name].get_tensor(name)


def _shard_paths(model_dir: Path) -> list[Path]:
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    index_path = model_dir / INDEX_FILE
    if not index_path.exists():
        raise ValueError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    weight_map: dict[str, Any] = json.loads(index_path.read_text())["weight_map"]
    return [model_dir / name for name in sorted(set(weight_map.values()))]


def _parameter_sources(model: LlamaForCausalLM) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Each non-projection parameter with the checkpoint tensors copied into it."""
    yield model.embed_tokens, ["model.embed_tokens.weight"]
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        yield layer.input_layernorm.weight, [f"{prefix}input_layernorm.weight"]
        yield layer.post_attention_layernorm.weight, [f"{prefix}post_attention_layernorm.weight"]
    yield model.norm.weight, ["model.norm.weight"]
    if not model.arch.tie_word_embeddings:
        yield model.lm_head, ["lm_head.weight"]


def _projection_sources(model: LlamaForCausalLM) -> Iterator[tuple[nn.Module, str, list[str]]]:
    """Each projection (owner, attribute) with the HF Linear modules fused into it."""
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        attn = prefix + "self_attn."
        yield layer.self_attn, "qkv_proj", [f"{attn}{name}_proj" for name in ("q", "k", "v")]
        yield layer.self_attn, "o_proj", [f"{attn}o_proj"]
        yield layer.mlp, "gate_up_proj", [f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"]
        yield layer.mlp, "down_proj", [f"{prefix}mlp.down_proj"]


def _load_projection(owner: nn.Module, attribute: str, module_names: list[str],
                     reader: _Reader, quantization: QuantizationConfig | None) -> None:
    """Fill a float projection in place, or replace it with a quantized one."""
    projection: FloatProjection = getattr(owner, attribute)
    is_quantized = [f"{name}.weight_packed" in reader for name in module_names]
    bias_names = [f"{name}.bias" for name in module_names]
    if not any(is_quantized):
        weight_names = [f"{name}.weight" for name in module_names]
        _copy_fused(projection.weight, [reader(name) for name in weight_names], weight_names)
        if projection.bias is not None:
            _copy_fused(projection.bias, [reader(name) for name in bias_names], bias_names)
        return
    if not all(is_quantized) or quantization is None:
        raise ValueError(
            f"{module_names} must all be quantized (weight_packed) under a "
            "compressed-tensors quantization_config, or all float"
        )
    parts = [read_quantized(reader, name, quantization.weight_args(name))
             for name in module_names]
    bias = torch.cat([reader(name) for name in bias_names]) if projection.bias is not None else None
    weight = projection.weight
    setattr(owner, attribute, make_projection(
        cat_rows(parts, module_names), bias, dtype=weight.dtype, device=weight.device
    ))


def _log_kernels(model_dir: Path, model: LlamaForCausalLM) -> None:
    kernels: Counter[str] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, Projection):
            logger.debug("%s: %s", name, module.describe())
            kernels[module.describe()] += 1
    summary = ", ".join(f"{count} x {kernel}" for kernel, count in sorted(kernels.items()))
    logger.info("loaded %s: projections %s", model_dir, summary)


def _copy_fused(parameter: torch.Tensor, sources: list[torch.Tensor], names: list[str]) -> None:
    offset = 0
    for source, name in zip(sources, names, strict=True):
        rows = source.shape[0]
        target = parameter[offset : offset + rows]
        if source.shape != target.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(source.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(source)
        offset += rows
    if offset != parameter.shape[0]:
        raise ValueError(f"tensors {names} fill {offset} of {parameter.shape[0]} rows")
