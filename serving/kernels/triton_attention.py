"""Quiver's paged-attention ops on CUDA: Triton kernels that read KV blocks in place.

Both write the step's K/V to their slots first (`index_copy_`), then attend with an online
softmax in float32 (a running max and sum per query row, the accumulated values rescaled as
the max grows), walking each request's block table on the GPU; the query heads that share
a KV head are served by one program, so each K/V row is read once per KV head.

- `quiver::paged_attention_decode` (decodes only; what CUDA graphs capture): one program
  per (request, KV head), `CHUNK_TOKENS` positions at a time, its products as broadcast
  multiply-and-sum. Shapes and strides are its only host-side inputs.
- `quiver::paged_attention` (any step: decodes and prefill chunks with or without cached
  context): one program per (request, block of `BLOCK_M` query rows, KV head), the rows of
  all its query heads stacked into one tile for `tl.dot` (tensor cores), causal within the
  chunk; programs past a request's rows return at once. It reads the index's header once
  (one sync a layer), for the grid; eager steps only.

`register(op)` attaches one to its op's CUDA dispatch key once `check(op, ...)` passed; they
need Triton, which comes with torch's CUDA wheels (without it, or where one fails its
check, the decode op keeps its any-device kernel, which gathers every row's whole table,
and the reference op stands in for the other). With
`TRITON_INTERPRET=1` set before this module is imported, Triton runs the kernels on CPU
tensors (how the CPU test suite checks them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from serving.kernels.metadata import StepIndex, pack_step_index, unpack_decode_index
from serving.kernels.ops import paged_attention_reference, write_kv

# Positions the decode kernel reads per iteration: two blocks of 16 at once, so each
# iteration's loads are long enough to keep the memory system busy, fewer where the heads'
# [group, positions, head_dim] float32 products would not fit a program's registers.
CHUNK_TOKENS = 32
CHUNK_VALUES = 8192


def decode_chunk(group_pad: int, dim_pad: int) -> int:
    return max(8, min(CHUNK_TOKENS, CHUNK_VALUES // (group_pad * dim_pad)))


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


def _write_kv_and_allocate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both kernels' host side before the launch: K/V written to their slots, the cache's
    K and V halves, and the output `[T, heads * D]` to fill."""
    write_kv(kv_cache, slot_mapping, key, value)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if query.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("Quiver's Triton attention kernels need unit-stride head dims")
    return k_cache, v_cache, query.new_empty(query.shape[0], query.shape[1] * query.shape[2])


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
    k_cache, v_cache, output = _write_kv_and_allocate(query, key, value, kv_cache,
                                                      slot_mapping)
    group = num_heads // num_kv_heads
    group_pad, dim_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    _decode_kernel[(num_seqs, num_kv_heads)](
        query, k_cache, v_cache, output, seq_lens, block_tables,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        output.stride(0), block_tables.stride(0), scale,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, CHUNK=decode_chunk(group_pad, dim_pad),
    )
    return output


# Query heads x rows stacked in one program's tile (its M for tl.dot): 16 rows of a GQA-4
# model, 64 of a model without GQA.
TILE_ROWS = 64
BLOCK_N = 32  # positions per iteration of the varlen kernel


@triton.jit
def _varlen_kernel(
    query, k_cache, v_cache, output, query_start, seq_lens, block_tables,
    query_row_stride, query_head_stride, slot_stride, kv_head_stride, output_row_stride,
    table_row_stride, scale, first_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_FP32: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    query_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    first_token = tl.load(query_start + seq)
    query_len = tl.load(query_start + seq + 1) - first_token
    if query_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens + seq)
    context_len = seq_len - query_len
    # tile row r: query row `rows` of the chunk, head `kv_head * GROUP + groups` of it
    tile = tl.arange(0, BLOCK_M * GROUP_PAD)
    rows = query_block * BLOCK_M + tile // GROUP_PAD
    groups = tile % GROUP_PAD
    is_row = (rows < query_len) & (groups < GROUP)
    dims = tl.arange(0, DIM_PAD)
    dim_mask = dims < HEAD_DIM
    tokens = first_token + rows
    heads = kv_head * GROUP + groups
    q = tl.load(query + tokens[:, None] * query_row_stride + heads[:, None] * query_head_stride
                + dims[None, :], mask=is_row[:, None] & dim_mask[None, :], other=0.0)
    last_visible = context_len + rows  # row i sees positions <= context_len + i
    kv_end = tl.minimum(seq_len, context_len + (query_block + 1) * BLOCK_M)

    running_max = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, DIM_PAD], tl.float32)
    columns = tl.arange(0, BLOCK_N)
    for start in range(0, kv_end, BLOCK_N):
        positions = start + columns
        is_position = positions < kv_end
        blocks = tl.load(block_tables + seq * table_row_stride + positions // BLOCK_SIZE,
                         mask=is_position, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        kv_offsets = (slots[:, None] * slot_stride + kv_head * kv_head_stride
                      + dims[None, :])
        kv_mask = is_position[:, None] & dim_mask[None, :]
        k = tl.load(k_cache + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache + kv_offsets, mask=kv_mask, other=0.0)
        if IS_FP32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        is_visible = (positions[None, :] <= last_visible[:, None]) & is_position[None, :]
        scores = tl.where(is_visible, scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        if IS_FP32:
            values = tl.dot(weights, v, input_precision="ieee")
        else:
            values = tl.dot(weights.to(v.dtype), v)
        acc = acc * rescale[:, None] + values
        running_max = new_max
    result = acc / running_sum[:, None]
    tl.store(output + tokens[:, None] * output_row_stride + heads[:, None] * HEAD_DIM
             + dims[None, :], result.to(output.dtype.element_ty),
             mask=is_row[:, None] & dim_mask[None, :])


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """`quiver::paged_attention`'s meaning (`serving.kernels.ops`), through Triton."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    index = StepIndex.unpack(metadata)
    k_cache, v_cache, output = _write_kv_and_allocate(query, key, value, kv_cache,
                                                      index.slot_mapping)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, TILE_ROWS // group_pad)
    num_decodes, num_chunks = index.num_decodes, index.num_seqs - index.num_decodes
    # Two launches, so a step of many decodes and one long chunk does not start a no-op
    # program per decode for every block of the chunk: decodes (one query block each),
    # then the chunks, as many blocks each as the longest could need (every token past the
    # decodes).
    launches = [(0, num_decodes, 1),
                (num_decodes, num_chunks, triton.cdiv(num_tokens - num_decodes, block_m))]
    for first_seq, num_seqs, num_blocks in launches:
        if num_seqs == 0:
            continue
        _varlen_kernel[(num_seqs, num_blocks, num_kv_heads)](
            query, k_cache, v_cache, output, index.query_start, index.seq_lens,
            index.block_tables, query.stride(0), query.stride(1), k_cache.stride(0),
            k_cache.stride(1), output.stride(0), index.block_tables.stride(0), scale,
            first_seq, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
            DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, IS_FP32=query.dtype == torch.float32,
        )
    return output


KERNELS = {"paged_attention_decode": paged_attention_decode,
           "paged_attention": paged_attention}
_LIBRARY = torch.library.Library("quiver", "IMPL")  # registrations live as long as it does


@functools.cache
def register(op_name: str) -> None:
    """Make this module's kernel op `op_name`'s CUDA kernel (once per process)."""
    _LIBRARY.impl(op_name, KERNELS[op_name], "CUDA")


CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check(op_name: str, device: torch.device, *, num_queries_per_kv: int, head_dim: int,
          dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> None:
    """Raise unless op `op_name`'s kernel here answers small steps as the reference op does
    (`paged_attention`: a mixed step and a decode step; `paged_attention_decode`: the
    decode step), in each of `dtypes`. Run before registering: a kernel that a Triton or
    driver miscompiles leaves the op's other kernel in place."""
    generator = torch.Generator().manual_seed(0)
    num_kv_heads, block_size = 2, 16
    num_heads = num_kv_heads * num_queries_per_kv
    steps = {  # decodes, then a chunk after cached context and a fresh prompt
        "mixed": ([1, 1, 20, 7], [5, 40, 33, 7]),
        "decodes": ([1, 1, 1], [1, 17, 40]),
    }
    if op_name == "paged_attention_decode":
        del steps["mixed"]
    kernel = KERNELS[op_name]
    for dtype in dtypes:
        for name, (query_lens, seq_lens) in steps.items():
            tables, next_block = [], 0
            for seq_len in seq_lens:
                count = -(-seq_len // block_size)
                tables.append(list(range(next_block, next_block + count))[::-1])
                next_block += count
            metadata = pack_step_index(query_lens=query_lens, seq_lens=seq_lens,
                                       block_tables=tables, block_size=block_size).to(device)
            shape = (2, next_block * block_size, num_kv_heads, head_dim)
            cache = torch.randn(shape, generator=generator).to(device, dtype)
            qkv = torch.randn(sum(query_lens), num_heads + 2 * num_kv_heads, head_dim,
                              generator=generator).to(device, dtype)
            q, k, v = qkv.split((num_heads, num_kv_heads, num_kv_heads), dim=1)
            expected = paged_attention_reference(q, k, v, cache.clone(), metadata, block_size,
                                                 head_dim**-0.5)
            output = kernel(q, k, v, cache.clone(), metadata, block_size, head_dim**-0.5)
            error = (output.float() - expected.float()).abs().max().item()
            if not error <= CHECK_TOLERANCE[dtype]:  # also false for NaN
                raise RuntimeError(f"Triton {op_name} is off by {error:.3g} on a {name} step "
                                   f"in {dtype}")
