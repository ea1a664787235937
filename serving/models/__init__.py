"""Our own torch model code for the Llama family over a paged KV cache."""

from serving.models.attention import AttentionMetadata, paged_attention
from serving.models.config import ModelArchConfig, RopeConfig, kv_cache_bytes_per_block
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import load_model, resolve_dtype

__all__ = [
    "AttentionMetadata",
    "LlamaForCausalLM",
    "ModelArchConfig",
    "RopeConfig",
    "kv_cache_bytes_per_block",
    "load_model",
    "paged_attention",
    "resolve_dtype",
]
