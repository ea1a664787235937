"""Architecture of a Llama-family checkpoint, parsed from its HF `config.json`.

Reads both the transformers-5 `rope_parameters` dict and the transformers-4 `rope_theta` +
`rope_scaling` keys. Every unsupported setting raises `ValueError` naming the key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.families import LLAMA_FAMILY

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base `theta` and, for `linear` / `llama3`, the scaling knobs."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelArchConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelArchConfig:
        path = Path(model_dir) / "config.json"
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ModelArchConfig:
        model_type = config.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise ValueError(
                f"model_type {model_type!r} is not supported; expected one of "
                f"{', '.join(LLAMA_FAMILY)}"
            )
        _check_unsupported(config)
        hidden_size = _require(config, "hidden_size")
        num_heads = _require(config, "num_attention_heads")
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        return cls(
            model_type=model_type,
            hidden_size=hidden_size,
            intermediate_size=_require(config, "intermediate_size"),
            num_hidden_layers=_require(config, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            vocab_size=_require(config, "vocab_size"),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            rope=parse_rope(config),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_token_ids(config.get("eos_token_id")),
            dtype=_parse_dtype(config),
        )


def kv_cache_bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block: K and V of `block_size` tokens in every layer."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_token = arch.num_key_value_heads * arch.head_dim * element_size
    return 2 * arch.num_hidden_layers * block_size * per_token


def parse_rope(config: Mapping[str, Any]) -> RopeConfig:
    """`rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4)."""
    params = dict(config.get("rope_parameters") or {})
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor other than 1.0 is not supported")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return RopeConfig(theta=theta)
    factor = float(_require(params, "factor", "rope_parameters.factor"))
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(
            _require(params, "low_freq_factor", "rope_parameters.low_freq_factor")
        ),
        high_freq_factor=float(
            _require(params, "high_freq_factor", "rope_parameters.high_freq_factor")
        ),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings")
            or config.get("max_position_embeddings", 8192)
        ),
    )


def _check_unsupported(config: Mapping[str, Any]) -> None:
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; expected 'silu'")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if config.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"pretraining_tp={config['pretraining_tp']} is not supported")
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        logger.warning(
            "sliding_window=%s is ignored: every layer attends to the full context",
            config["sliding_window"],
        )


def _require(config: Mapping[str, Any], key: str, name: str | None = None) -> Any:
    value = config.get(key)
    if value is None:
        raise ValueError(f"config.json is missing {name or key!r}")
    return value


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _parse_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]
