"""Parsing HF config.json into `ModelArchConfig`, and RoPE frequencies vs transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from serving.models.config import ModelArchConfig, kv_cache_bytes_per_block
from serving.models.rope import compute_inv_freq

BASE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 131072,
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_tiny_model_config(tiny_model_dir: Path) -> None:
    arch = ModelArchConfig.from_model_dir(tiny_model_dir)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (4, 2, 16)
    assert arch.num_queries_per_kv == 2
    assert arch.tie_word_embeddings and not arch.attention_bias
    assert arch.rope.rope_type == "default" and arch.rope.theta == 10000.0
    assert arch.eos_token_ids == (2,) and arch.bos_token_id == 1
    assert arch.dtype == torch.float32


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    assert ModelArchConfig.from_dict(BASE).head_dim == 32
    assert ModelArchConfig.from_dict({**BASE, "head_dim": 64}).head_dim == 64


def _reference_inv_freq(config: dict[str, Any]) -> torch.Tensor:
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)[0]
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config)[0]


@pytest.mark.parametrize(
    "rope_keys",
    [
        {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}},
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},
        {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
        {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
        {"rope_theta": 123.0},
    ],
    ids=["llama3-v5", "llama3-v4", "linear-v4-type-key", "default-v5", "default-v4"],
)
def test_rope_frequencies_match_transformers(rope_keys: dict[str, Any]) -> None:
    config = {**BASE, **rope_keys}
    arch = ModelArchConfig.from_dict(config)
    ours = compute_inv_freq(arch.rope, arch.head_dim)
    torch.testing.assert_close(ours, _reference_inv_freq(config), rtol=0, atol=0)


def test_llama3_scaling_values_are_parsed() -> None:
    arch = ModelArchConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3_SCALING})
    assert arch.rope.rope_type == "llama3"
    assert (arch.rope.factor, arch.rope.low_freq_factor, arch.rope.high_freq_factor) == (8, 1, 4)
    assert arch.rope.original_max_position_embeddings == 8192


def test_qwen2_has_qkv_bias_by_default_and_sliding_window_is_ignored(caplog) -> None:
    config = {**BASE, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True}
    with caplog.at_level(logging.WARNING, logger="serving.models.config"):
        arch = ModelArchConfig.from_dict(config)
    assert arch.attention_bias
    assert "sliding_window" in caplog.text
    assert not ModelArchConfig.from_dict({**config, "attention_bias": False}).attention_bias
    assert not ModelArchConfig.from_dict(BASE).attention_bias


def test_eos_list_and_dtype_keys() -> None:
    arch = ModelArchConfig.from_dict({**BASE, "eos_token_id": [7, 9], "torch_dtype": "bfloat16"})
    assert arch.eos_token_ids == (7, 9)
    assert arch.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": None}, "vocab_size"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_configs_name_the_key(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelArchConfig.from_dict({**BASE, **override})


def test_missing_config_json_key_from_file(tmp_path: Path) -> None:
    config = dict(BASE)
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size"):
        ModelArchConfig.from_model_dir(tmp_path)


def test_kv_cache_bytes_per_block() -> None:
    arch = ModelArchConfig.from_dict(BASE)
    # K and V x 2 layers x 16 tokens x 2 kv heads x 32 dims x 2 bytes
    assert kv_cache_bytes_per_block(arch, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 32 * 2
    assert kv_cache_bytes_per_block(arch, 16, torch.float32) == 2 * 2 * 16 * 2 * 32 * 4
