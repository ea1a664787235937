"""Quiver's torch custom ops (opaque to torch.compile): paged attention and packed linear.

Two attention ops share one schema and one meaning (`csrc/paged_attention.cpp` states it):

- `quiver::paged_attention`: defined here; its CPU kernel is the C++ library that
  `serving.kernels.build` compiles and loads, its CUDA kernel Triton's
  (`serving.kernels.triton_attention`). Without either it has no kernel.
- `quiver::paged_attention_reference`: the same computation in plain torch ops (K/V written
  with `index_copy_`, decode contexts gathered block by block into one SDPA call, prefill
  chunks through SDPA with a causal bias). It runs on any device and is the fallback.

Both are registered with fake (meta) implementations so a compiled graph can hold them: the
graph sees one opaque call per layer, whose only output is `[T, H * D]`.

`quiver::paged_attention_decode` has the same schema and meaning for a step whose every row
is a decode, and reads the index's sizes from the tensors' shapes instead of its header
(`metadata.unpack_decode_index`), so nothing goes back to the host: the op CUDA graphs
capture (`serving.models.cuda_graphs`). Its kernel here gathers each row's whole block
table and masks past its length (any device); on CUDA, `serving.kernels.triton_attention`
registers a Triton kernel that walks each row's blocks up to its length.

`quiver::linear(x, weight, bias)` is `F.linear` on a weight laid out once by
`quiver::pack_linear_weight` (`csrc/packed_linear.cpp` says why and how): a bf16 weight in
Quiver's own tile layout where the CPU has AVX512-BF16 (`csrc/tile_linear.h`), a float32
weight of bf16 values (a bf16 checkpoint served in float32) as bf16 panels on AVX2
(`csrc/panel_linear.h`), else oneDNN's;
over one or two bf16 rows Quiver's bandwidth-bound kernel (`csrc/skinny_linear.h`) on the
plain weight. It has only the C++ CPU kernel. `quiver::set_skinny_max_rows(rows)` (a composite
C++ kernel: no tensor to dispatch on) lowers how many rows that kernel takes (0: none) and
returns the previous limit; `quiver::set_linear_tiles(enabled)` chooses whether later packs
may use Quiver's tile or panel layouts, returning the previous setting;
`quiver::packed_linear_layout(weight)` names the twin a weight has ("tiles", "panels",
"onednn" or "none").
`quiver::int8_linear(x, packed, scale, bias)` and `quiver::int4_linear(x, packed, group_size,
scale, offset)` multiply bf16 rows (AVX512-BF16 CPUs) or float32 rows (AVX2 and FMA) by a
per-channel int8 or a grouped int4 weight packed at load (`csrc/lowbit_linear.h`,
`csrc/lowbit_float.h`). `quiver::row_argmax(logits)` is greedy
sampling's argmax over float32 logits (`csrc/row_argmax.h`; `row_argmax` below picks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.kernels.metadata import StepIndex, unpack_decode_index

SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor metadata, "
    "int block_size, float scale) -> Tensor"
)

_LIBRARY = torch.library.Library("quiver", "DEF")  # the op namespace, once per process
_LIBRARY.define("paged_attention" + SCHEMA)
_LIBRARY.define("paged_attention_reference" + SCHEMA)
_LIBRARY.define("paged_attention_decode" + SCHEMA)


def _fake(query, key, value, kv_cache, metadata, block_size, scale):
    return query.new_empty(query.shape[0], query.shape[1] * query.shape[2])


torch.library.register_fake("quiver::paged_attention", _fake, lib=_LIBRARY)
torch.library.register_fake("quiver::paged_attention_reference", _fake, lib=_LIBRARY)
torch.library.register_fake("quiver::paged_attention_decode", _fake, lib=_LIBRARY)

_LIBRARY.define("pack_linear_weight(Tensor weight, int batch_size) -> ()")
_LIBRARY.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.define("int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias) -> Tensor")
_LIBRARY.define("set_skinny_max_rows(int rows) -> int")
_LIBRARY.define("set_linear_tiles(bool enabled) -> bool")
_LIBRARY.define("packed_linear_layout(Tensor weight) -> str")
_LIBRARY.define("row_argmax(Tensor logits) -> Tensor")
_LIBRARY.define("int4_linear(Tensor x, Tensor packed, int group_size, Tensor scale, "
                "Tensor offset) -> Tensor")


@torch.library.register_fake("quiver::linear", lib=_LIBRARY)
def _linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("quiver::int8_linear", lib=_LIBRARY)
def _int8_linear_fake(x, packed, scale, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0] * 16)


@torch.library.register_fake("quiver::int4_linear", lib=_LIBRARY)
def _int4_linear_fake(x, packed, group_size, scale, offset):
    return x.new_empty(*x.shape[:-1], packed.shape[0] * 16)


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` for `[rows, vocab]` logits (the same answer: first maximum, a
    NaN's index where a row has one), through `quiver::row_argmax` for contiguous float32
    CPU logits where the C++ library is loaded — torch's took 0.66 ms over 32 x 49,152 on a
    2-core Zen 4 — else torch's."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 0 and logits.is_contiguous() and _has_cpu_kernel("row_argmax")):
        return torch.ops.quiver.row_argmax(logits)
    return logits.argmax(-1)


def _has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"quiver::{name}", "CPU")


def lowbit_kernels_run(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the loaded C++ library's low-bit kernels take rows of `dtype`: bf16 rows on
    AVX512-BF16 CPUs, float32 rows on CPUs with AVX2 and FMA; elsewhere (and for any other
    dtype) they refuse, as does an unloaded library."""
    try:
        torch.ops.quiver.int8_linear(torch.zeros(1, 2, dtype=dtype),
                                     torch.zeros(1, 1, 32, dtype=torch.int8), torch.ones(16),
                                     None)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor) -> None:
    """Every attention op's first step: the step's K and V `[T, kv_heads, D]` into their
    slots of the layer's cache `[2, num_slots, kv_heads, D]`."""
    kv_cache[0].index_copy_(0, slot_mapping, key)
    kv_cache[1].index_copy_(0, slot_mapping, value)


def paged_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The pure-torch implementation (any device)."""
    index = StepIndex.unpack(metadata)
    write_kv(kv_cache, index.slot_mapping, key, value)
    outputs = []
    if index.num_decodes:
        outputs.append(_decode(query[: index.num_decodes], kv_cache, index, block_size, scale))
    for seq in range(index.num_decodes, index.num_seqs):
        outputs.append(_prefill(query, key, value, kv_cache, index, seq, block_size, scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


_LIBRARY.impl("paged_attention_reference", paged_attention_reference,
              "CompositeExplicitAutograd")


def paged_attention_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Decodes only, sizes from shapes: every row's whole block table gathered, masked past
    its length (any device; the CUDA kernel is `serving.kernels.triton_attention`)."""
    slot_mapping, seq_lens, block_tables = unpack_decode_index(metadata, query.shape[0])
    write_kv(kv_cache, slot_mapping, key, value)
    return _attend_decodes(query, kv_cache, seq_lens, block_tables, block_size, scale)


_LIBRARY.impl("paged_attention_decode", paged_attention_decode, "CompositeExplicitAutograd")


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor,
                   block_size: int) -> torch.Tensor:
    """`[num_slots, KV, D]` gathered by block ids `[B, n]` -> `[B, KV, n * block_size, D]`."""
    num_slots, num_kv_heads, head_dim = cache.shape
    blocks = cache.view(num_slots // block_size, block_size * num_kv_heads * head_dim)
    gathered = blocks.index_select(0, block_tables.reshape(-1))
    return gathered.view(block_tables.shape[0], -1, num_kv_heads, head_dim).transpose(1, 2)


def _decode(query: torch.Tensor, kv_cache: torch.Tensor, index: StepIndex, block_size: int,
            scale: float) -> torch.Tensor:
    batch = query.shape[0]
    seq_lens = index.seq_lens[:batch]
    num_blocks = -(-int(seq_lens.max()) // block_size)
    return _attend_decodes(query, kv_cache, seq_lens, index.block_tables[:batch, :num_blocks],
                           block_size, scale)


def _attend_decodes(query: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
                    tables: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """One query row per request over its gathered blocks, masked past `seq_lens`. Nothing
    past a row's length is trusted: table entries there become block 0 before the gather (a
    CUDA graph's tables hold stale ids there) and what they give is zeroed as well as masked
    (so garbage, even NaN, cannot reach the output)."""
    batch, num_heads, head_dim = query.shape
    block_starts = torch.arange(tables.shape[1], device=query.device) * block_size
    tables = torch.where(block_starts[None, :] < seq_lens[:, None], tables, 0)
    is_valid = (torch.arange(tables.shape[1] * block_size, device=query.device)[None, :]
                < seq_lens[:, None])
    is_padding = ~is_valid[:, None, :, None]
    keys = _gather_blocks(kv_cache[0], tables, block_size).masked_fill(is_padding, 0)
    values = _gather_blocks(kv_cache[1], tables, block_size).masked_fill(is_padding, 0)
    num_kv_heads = keys.shape[1]
    bias = torch.zeros(is_valid.shape, dtype=query.dtype, device=query.device)
    bias = bias.masked_fill_(~is_valid, float("-inf"))[:, None, None, :]
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bias, scale=scale)
    return output.reshape(batch, num_heads * head_dim)


def _prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             kv_cache: torch.Tensor, index: StepIndex, seq: int, block_size: int,
             scale: float) -> torch.Tensor:
    start, end = int(index.query_start[seq]), int(index.query_start[seq + 1])
    query_len, seq_len = end - start, int(index.seq_lens[seq])
    _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    # [T, KV, g, D] -> [1, KV, g * T, D]: query heads sharing a KV head become extra rows
    grouped = query[start:end].reshape(query_len, num_kv_heads, group, head_dim)
    grouped = grouped.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * query_len, head_dim)
    if seq_len == query_len:
        keys, values = key[start:end].transpose(0, 1)[None], value[start:end].transpose(0, 1)[None]
    else:
        table = index.block_tables[seq : seq + 1, : -(-seq_len // block_size)]
        keys = _gather_blocks(kv_cache[0], table, block_size)[:, :, :seq_len]
        values = _gather_blocks(kv_cache[1], table, block_size)[:, :, :seq_len]
    rows = torch.arange(query_len, device=query.device)[:, None] + (seq_len - query_len)
    is_future = torch.arange(seq_len, device=query.device)[None, :] > rows
    bias = torch.zeros(is_future.shape, dtype=query.dtype, device=query.device)
    bias = bias.masked_fill_(is_future, float("-inf")).repeat(group, 1)
    output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bias, scale=scale)
    # [1, KV, g * T, D] -> [T, KV * g * D]
    output = output.view(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
    return output.reshape(query_len, num_heads * head_dim)
