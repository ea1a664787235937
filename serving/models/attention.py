"""Attention over a paged KV cache, with its per-step metadata passed explicitly.

A layer's KV cache is one tensor `[2, num_blocks * block_size, num_kv_heads, head_dim]`
(K then V); the slot of position p of a request is
`block_table[p // block_size] * block_size + p % block_size`.

The flat batch holds decodes first (one query token each), then prefill chunks. Each layer
makes one call to a paged-attention op (`serving.kernels`): it writes the step's K/V into
their slots and attends, decodes reading their blocks in place (the C++ kernel) or gathered
(the pure-torch reference). The op is opaque to `torch.compile`, so a compiled forward pass
is one graph whatever the batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.kernels import AttentionOp
from serving.kernels.metadata import pack_step_index


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the KV cache and what each one attends to."""

    # The packed int64 step index of `serving.kernels.metadata`, on the model's device.
    step_index: torch.Tensor
    block_size: int

    @classmethod
    def build(
        cls,
        *,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for a batch whose requests come decodes first, then prefill chunks;
        `seq_lens` are the context lengths after this step (last position + 1)."""
        step_index = pack_step_index(
            query_lens=query_lens, seq_lens=seq_lens, block_tables=block_tables,
            block_size=block_size,
        )
        return cls(step_index=step_index.to(device), block_size=block_size)


def paged_attention(
    op: AttentionOp,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V `[T, kv_heads, D]` into the cache, attend with `query`
    `[T, heads, D]`; returns `[T, heads * D]`."""
    return op.op(query, key, value, kv_cache, metadata.step_index, metadata.block_size, scale)
