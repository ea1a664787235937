"""Attention over a paged KV cache, with its per-step metadata passed explicitly.

A layer's KV cache is one tensor `[2, num_blocks * block_size, num_kv_heads, head_dim]`
(K then V); the slot of position p of a request is
`block_table[p // block_size] * block_size + p % block_size`.

The flat batch holds decodes first (one query token each), then prefill chunks. Decodes run
as one `scaled_dot_product_attention` call over their block-gathered contexts. GQA needs
no K/V expansion: the query heads that share a KV head are laid out as extra query rows of
that KV head (decodes: `[B, kv_heads, group, D]`; prefills: `[1, kv_heads, group * T, D]`),
with an additive bias that masks padding and future positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    """One prefill chunk: rows `query_start : query_start + query_len` of the batch."""

    query_start: int
    query_len: int
    # Context length after this step (cached tokens + this chunk).
    seq_len: int
    # `[ceil(seq_len / block_size)]` block ids.
    block_table: torch.Tensor
    # `[num_queries_per_kv * query_len, seq_len]`, 0 where attended, -inf elsewhere.
    attn_bias: torch.Tensor

    @property
    def has_context(self) -> bool:
        return self.seq_len > self.query_len


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the KV cache and what each one attends to."""

    # `[num_tokens]` cache slot of every token of the batch.
    slot_mapping: torch.Tensor
    block_size: int
    # The first `num_decodes` rows are single-token queries of distinct requests.
    num_decodes: int
    # `[num_decodes, max_decode_blocks]`, padded with block 0 (masked by the bias).
    decode_block_tables: torch.Tensor | None
    # `[num_decodes, 1, 1, max_decode_blocks * block_size]`.
    decode_attn_bias: torch.Tensor | None
    prefills: list[PrefillChunk]

    @classmethod
    def build(
        cls,
        *,
        positions: torch.Tensor,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        num_queries_per_kv: int,
        dtype: torch.dtype,
    ) -> AttentionMetadata:
        """Metadata for a batch whose requests come decodes first, then prefill chunks.
        `positions` is `[sum(query_lens)]`, each request's positions in order; `seq_lens`
        are the context lengths after this step (last position + 1)."""
        device = positions.device
        num_decodes = _count_leading_decodes(query_lens)
        max_blocks = max(len(block_table) for block_table in block_tables)
        padded = [
            block_table + [0] * (max_blocks - len(block_table)) for block_table in block_tables
        ]
        block_table_tensor = torch.tensor(padded, dtype=torch.long, device=device)
        slot_mapping = _slot_mapping(block_table_tensor, positions, query_lens, block_size)
        decode_block_tables = decode_attn_bias = None
        if num_decodes:
            decode_seq_lens = seq_lens[:num_decodes]
            num_blocks = -(-max(decode_seq_lens) // block_size)
            decode_block_tables = block_table_tensor[:num_decodes, :num_blocks]
            decode_attn_bias = _padding_bias(
                decode_seq_lens, num_blocks * block_size, dtype, device
            )
        prefills = _prefill_chunks(
            query_lens,
            seq_lens,
            block_table_tensor,
            num_decodes,
            block_size,
            num_queries_per_kv,
            dtype,
        )
        return cls(
            slot_mapping=slot_mapping,
            block_size=block_size,
            num_decodes=num_decodes,
            decode_block_tables=decode_block_tables,
            decode_attn_bias=decode_attn_bias,
            prefills=prefills,
        )


def _slot_mapping(
    block_tables: torch.Tensor, positions: torch.Tensor, query_lens: list[int], block_size: int
) -> torch.Tensor:
    device = positions.device
    request_index = torch.repeat_interleave(
        torch.arange(len(query_lens), device=device), torch.tensor(query_lens, device=device)
    )
    block_ids = block_tables[request_index, positions // block_size]
    return block_ids * block_size + positions % block_size


def _count_leading_decodes(query_lens: list[int]) -> int:
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    assert all(n > 1 for n in query_lens[num_decodes:]), "decodes must come first"
    return num_decodes


def _padding_bias(
    seq_lens: list[int], num_keys: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    key_index = torch.arange(num_keys, device=device)
    is_valid = key_index[None, :] < torch.tensor(seq_lens, device=device)[:, None]
    bias = torch.zeros(is_valid.shape, dtype=dtype, device=device)
    bias.masked_fill_(~is_valid, float("-inf"))
    return bias[:, None, None, :]


def _causal_bias(
    query_len: int, seq_len: int, group: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Query row i (position seq_len - query_len + i) sees keys 0..its position;
    rows repeated `group` times (group-major) for the GQA row layout."""
    offset = seq_len - query_len
    rows = torch.arange(query_len, device=device)[:, None] + offset
    is_future = torch.arange(seq_len, device=device)[None, :] > rows
    bias = torch.zeros(is_future.shape, dtype=dtype, device=device)
    bias.masked_fill_(is_future, float("-inf"))
    return bias.repeat(group, 1)


def _prefill_chunks(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,
    num_decodes: int,
    block_size: int,
    group: int,
    dtype: torch.dtype,
) -> list[PrefillChunk]:
    chunks = []
    query_start = num_decodes
    for index in range(num_decodes, len(query_lens)):
        query_len, seq_len = query_lens[index], seq_lens[index]
        num_blocks = -(-seq_len // block_size)
        chunks.append(
            PrefillChunk(
                query_start=query_start,
                query_len=query_len,
                seq_len=seq_len,
                block_table=block_tables[index, :num_blocks],
                attn_bias=_causal_bias(query_len, seq_len, group, dtype, block_tables.device),
            )
        )
        query_start += query_len
    return chunks


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V `[T, kv_heads, D]` into the cache, attend with `query`
    `[T, heads, D]`; returns `[T, heads * D]`."""
    kv_cache[0].index_copy_(0, metadata.slot_mapping, key)
    kv_cache[1].index_copy_(0, metadata.slot_mapping, value)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    outputs = []
    if metadata.num_decodes:
        outputs.append(_decode_attention(query[: metadata.num_decodes], kv_cache, metadata, scale))
    for chunk in metadata.prefills:
        end = chunk.query_start + chunk.query_len
        outputs.append(
            _prefill_attention(
                query[chunk.query_start : end],
                key[chunk.query_start : end],
                value[chunk.query_start : end],
                kv_cache,
                chunk,
                metadata.block_size,
                scale,
                num_kv_heads,
            )
        )
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    assert output.shape == (num_tokens, num_heads * head_dim)
    return output


def _gather_blocks(
    cache: torch.Tensor, block_tables: torch.Tensor, block_size: int
) -> torch.Tensor:
    """`[num_slots, kv_heads, D]` gathered by block ids `[B, n]` -> `[B, kv_heads, n * bs, D]`
    (a strided view of one contiguous copy)."""
    num_slots, num_kv_heads, head_dim = cache.shape
    # 2-D rows of one block each: index_select's fast memcpy path.
    blocks = cache.view(num_slots // block_size, block_size * num_kv_heads * head_dim)
    gathered = blocks.index_select(0, block_tables.reshape(-1))
    batch = block_tables.shape[0]
    return gathered.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)


def _decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    assert metadata.decode_block_tables is not None
    batch, num_heads, head_dim = query.shape
    keys = _gather_blocks(kv_cache[0], metadata.decode_block_tables, metadata.block_size)
    values = _gather_blocks(kv_cache[1], metadata.decode_block_tables, metadata.block_size)
    num_kv_heads = keys.shape[1]
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    output = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=metadata.decode_attn_bias, scale=scale
    )
    return output.reshape(batch, num_heads * head_dim)


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    chunk: PrefillChunk,
    block_size: int,
    scale: float,
    num_kv_heads: int,
) -> torch.Tensor:
    query_len, num_heads, head_dim = query.shape
    group = num_heads // num_kv_heads
    # [T, kv, g, D] -> [1, kv, g * T, D]
    grouped = query.reshape(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    grouped = grouped.reshape(1, num_kv_heads, group * query_len, head_dim)
    if chunk.has_context:
        table = chunk.block_table[None]
        keys = _gather_blocks(kv_cache[0], table, block_size)[:, :, : chunk.seq_len]
        values = _gather_blocks(kv_cache[1], table, block_size)[:, :, : chunk.seq_len]
    else:
        keys = key.transpose(0, 1)[None]
        values = value.transpose(0, 1)[None]
    output = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=chunk.attn_bias, scale=scale
    )
    # [1, kv, g * T, D] -> [T, kv * g * D]
    output = output.view(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
    return output.reshape(query_len, num_heads * head_dim)
