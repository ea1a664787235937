"""Rotary position embedding: inverse frequencies (default, linear, llama3) and a cos/sin
table precomputed once up to the maximum model length, indexed by position each step."""

from __future__ import annotations

import math

import torch
from torch import nn

from serving.models.config import RopeConfig


def compute_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Float32 inverse frequencies `[head_dim // 2]`, as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    assert rope.original_max_position_embeddings is not None
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / rope.low_freq_factor
    high_freq_wavelen = old_context_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE (rotate-half convention) to query and key heads at given positions."""

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_position: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(rope, head_dim)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        # [max_position, 2, head_dim // 2]: cos then sin, in the model dtype.
        cos_sin = torch.stack((freqs.cos(), freqs.sin()), dim=1).to(dtype)
        self.register_buffer("cos_sin_cache", cos_sin.to(device), persistent=False)
        self.head_dim = head_dim

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin `[T, 1, head_dim // 2]`, computed once per step for all layers."""
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        return cos_sin[:, 0, None, :], cos_sin[:, 1, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x` `[T, num_heads, head_dim]` (any row stride); returns a new tensor."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
