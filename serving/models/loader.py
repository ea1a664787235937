"""Load a Llama-family HF safetensors checkpoint into `LlamaForCausalLM`.

Reads `model.safetensors`, or the shards named by `model.safetensors.index.json`, and fuses
q/k/v and gate/up into one weight each while copying into the model's parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from serving.models.config import ModelArchConfig
from serving.models.llama import LlamaForCausalLM

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
) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    arch = ModelArchConfig.from_model_dir(model_dir)
    model = LlamaForCausalLM(
        arch, dtype=resolve_dtype(dtype, arch), device=device, max_model_len=max_model_len
    )
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(path, "pt")) for path in _shard_paths(model_dir)]
        tensors = {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118

        def read(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"checkpoint {model_dir} is missing tensor {name!r}")
            return tensors[name].get_tensor(name)

        with torch.no_grad():
            for parameter, source_names in _parameter_sources(model):
                _copy_fused(parameter, [read(name) for name in source_names], source_names)
    model.prepack()
    return model.eval()


def _shard_paths(model_dir: Path) -> list[Path]:
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    index_path = model_dir / INDEX_FILE
    if not index_path.exists():
        raise ValueError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    weight_map: dict[str, Any] = json.loads(index_path.read_text())["weight_map"]
    return [model_dir / name for name in sorted(set(weight_map.values()))]


def _parameter_sources(model: LlamaForCausalLM) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Each parameter with the checkpoint tensors that are concatenated into it."""
    yield model.embed_tokens, ["model.embed_tokens.weight"]
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        attn = prefix + "self_attn."
        qkv = [f"{attn}{name}_proj" for name in ("q", "k", "v")]
        yield layer.self_attn.qkv_proj, [f"{name}.weight" for name in qkv]
        if layer.self_attn.qkv_bias is not None:
            yield layer.self_attn.qkv_bias, [f"{name}.bias" for name in qkv]
        yield layer.self_attn.o_proj, [f"{attn}o_proj.weight"]
        yield (
            layer.mlp.gate_up_proj,
            [f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight"],
        )
        yield layer.mlp.down_proj, [f"{prefix}mlp.down_proj.weight"]
        yield layer.input_layernorm.weight, [f"{prefix}input_layernorm.weight"]
        yield layer.post_attention_layernorm.weight, [f"{prefix}post_attention_layernorm.weight"]
    yield model.norm.weight, ["model.norm.weight"]
    if not model.arch.tie_word_embeddings:
        yield model.lm_head, ["lm_head.weight"]


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
