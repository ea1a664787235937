"""`quiver::paged_attention_decode` on CUDA: a Triton kernel that reads KV blocks in place.

One program per (request, KV head): it loads the query heads that share the KV head, walks
the request's block table up to its context length (read on the GPU, so a CUDA graph
replays it for any length), `CHUNK` tokens at a time, and keeps an online softmax in
float32 (the running max and sum per query head, rescaling the accumulated values as the
max grows). The step's K/V are written to their slots first with `index_copy_`. Shapes and
strides are the kernel's only host-side inputs, so the op is safe inside a CUDA graph.

`register()` attaches the kernel to the op's CUDA dispatch key; it needs Triton, which comes
with torch's CUDA wheels. Where it is absent the op keeps its any-device kernel
(`serving.kernels.ops`), which gathers every row's whole block table. With
`TRITON_INTERPRET=1` set before this module is imported, Triton runs the kernel on CPU
tensors (how the CPU test suite checks it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from serving.kernels.metadata import unpack_decode_index

# Tokens a program reads per iteration: two blocks of 16 at once, so each iteration's loads
# are long enough to keep the memory system busy.
CHUNK_TOKENS = 32


@triton.jit
def _decode_kernel(
    query, k_cache, v_cache, output, seq_lens, block_tables,
    query_row_stride, query_head_stride, slot_stride, kv_head_stride, output_row_stride,
    table_row_stride, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens + row)
    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + groups
    head_mask = groups < GROUP
    dim_mask = dims < HEAD_DIM
    q = tl.load(query + row * query_row_stride + heads[:, None] * query_head_stride
                + dims[None, :], mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    q = q.to(tl.float32) * scale  # [GROUP_PAD, DIM_PAD]

    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    tokens = tl.arange(0, CHUNK)
    for start in range(0, seq_len, CHUNK):
        positions = start + tokens
        is_valid = positions < seq_len
        blocks = tl.load(block_tables + row * table_row_stride + positions // BLOCK_SIZE,
                         mask=is_valid, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        kv_offsets = (slots[:, None] * slot_stride + kv_head * kv_head_stride
                      + dims[None, :])
        kv_mask = is_valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, CHUNK]
        scores = tl.where(is_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    result = acc / running_sum[:, None]
    tl.store(output + row * output_row_stride + heads[:, None] * HEAD_DIM + dims[None, :],
             result.to(output.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])


def paged_attention_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """`quiver::paged_attention_decode`'s meaning (`serving.kernels.ops`), through Triton."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    slot_mapping, seq_lens, block_tables = unpack_decode_index(metadata, num_seqs)
    kv_cache[0].index_copy_(0, slot_mapping, key)
    kv_cache[1].index_copy_(0, slot_mapping, value)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if query.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("paged_attention_decode needs unit-stride head dims")
    output = query.new_empty(num_seqs, num_heads * head_dim)
    group = num_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads)](
        query, k_cache, v_cache, output, seq_lens, block_tables,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        output.stride(0), block_tables.stride(0), scale,
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        CHUNK=max(CHUNK_TOKENS, triton.next_power_of_2(block_size)),
    )
    return output


@functools.cache
def register() -> torch.library.Library:
    """Make this the op's CUDA kernel (once per process); the registration lives as long
    as the returned (cached) Library."""
    library = torch.library.Library("quiver", "IMPL")
    library.impl("paged_attention_decode", paged_attention_decode, "CUDA")
    return library
