// Paged attention for the native engine on CPU: one op per layer and step.
//
//   quiver::paged_attention(query [T, H, D], key [T, KV, D], value [T, KV, D],
//                           kv_cache [2, num_slots, KV, D] (mutated), metadata int64 [L],
//                           block_size, scale) -> [T, H * D]
//
// It writes the step's K/V into their cache slots, then attends. The flat batch holds
// decodes first (one query row each), then prefill chunks. Decode rows read their keys and
// values in place, block by block, with no gather: one task per (request, KV head) serves
// the H / KV query heads that share that KV head (GQA), in float32 (paged_decode.cpp).
// Prefill chunks go
// through ATen's scaled_dot_product_attention (GEMM-shaped work), over the chunk's own
// K/V when it has no cached context, else over its blocks gathered once.
//
// `metadata` packs every per-step index into one tensor so a compiled graph sees a single
// dynamic size (see serving/models/attention.py, which builds it):
//   [num_tokens, num_seqs, max_blocks, num_decodes,
//    slot_mapping[num_tokens], query_start[num_seqs + 1], seq_lens[num_seqs],
//    block_tables[num_seqs * max_blocks]]


#include "paged_attention.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace quiver {
namespace {

StepIndex parse_step_index(const at::Tensor& metadata) {
  TORCH_CHECK(metadata.scalar_type() == at::kLong && metadata.dim() == 1 &&
                  metadata.is_contiguous(),
              "metadata must be a contiguous int64 vector");
  const int64_t* data = metadata.data_ptr<int64_t>();
  TORCH_CHECK(metadata.numel() >= kHeaderSize, "metadata has no header");
  StepIndex index{data[0], data[1], data[2], data[3], nullptr, nullptr, nullptr, nullptr};
  const int64_t expected = kHeaderSize + index.num_tokens + 2 * index.num_seqs + 1 +
                           index.num_seqs * index.max_blocks;
  TORCH_CHECK(metadata.numel() == expected, "metadata has ", metadata.numel(),
              " entries, its header says ", expected);
  index.slot_mapping = data + kHeaderSize;
  index.query_start = index.slot_mapping + index.num_tokens;
  index.seq_lens = index.query_start + index.num_seqs + 1;
  index.block_tables = index.seq_lens + index.num_seqs;
  return index;
}

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              "attention inputs need contiguous heads");
  return {x.data_ptr<scalar_t>(), x.stride(0)};
}


template <typename scalar_t>
void write_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                 const StepIndex& index) {
  const int64_t row_size = key.size(1) * key.size(2);
  const int64_t num_slots = kv_cache.size(1);
  const Rows<scalar_t> keys = rows_of<scalar_t>(key), values = rows_of<scalar_t>(value);
  scalar_t* k_cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* v_cache = k_cache + num_slots * row_size;
  for (int64_t t = 0; t < index.num_tokens; ++t) {
    const int64_t slot = index.slot_mapping[t];
    TORCH_CHECK(slot >= 0 && slot < num_slots, "slot ", slot, " is outside the cache");
    std::memcpy(k_cache + slot * row_size, keys.row(t), row_size * sizeof(scalar_t));
    std::memcpy(v_cache + slot * row_size, values.row(t), row_size * sizeof(scalar_t));
  }
}

// `[n, KV, D]` rows of one cache half gathered by block ids -> `[1, KV, seq_len, D]`.
at::Tensor gather_blocks(const at::Tensor& cache, const int64_t* table, int64_t num_blocks,
                         int64_t block_size, int64_t seq_len) {
  const int64_t num_kv_heads = cache.size(1), head_dim = cache.size(2);
  at::Tensor blocks = cache.view({cache.size(0) / block_size, -1});
  at::Tensor ids = at::from_blob(const_cast<int64_t*>(table), {num_blocks}, at::kLong);
  at::Tensor gathered = blocks.index_select(0, ids).view({-1, num_kv_heads, head_dim});
  return gathered.narrow(0, 0, seq_len).transpose(0, 1).unsqueeze(0);
}

// One prefill chunk: query rows [start, start + query_len), context seq_len after it.
void prefill_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& kv_cache, at::Tensor& out, const StepIndex& index,
                       int64_t seq, int64_t block_size, double scale) {
  const int64_t start = index.query_start[seq];
  const int64_t query_len = index.query_start[seq + 1] - start;
  const int64_t seq_len = index.seq_lens[seq];
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = key.size(1), group = num_heads / num_kv_heads;
  // [T, KV, g, D] -> [1, KV, g * T, D]: the query heads sharing a KV head as extra rows.
  at::Tensor grouped = query.narrow(0, start, query_len)
                           .reshape({query_len, num_kv_heads, group, head_dim})
                           .permute({1, 2, 0, 3})
                           .reshape({1, num_kv_heads, group * query_len, head_dim});
  at::Tensor keys, values, bias;
  if (seq_len == query_len) {
    keys = key.narrow(0, start, query_len).transpose(0, 1).unsqueeze(0);
    values = value.narrow(0, start, query_len).transpose(0, 1).unsqueeze(0);
  } else {
    const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
    const int64_t* table = index.block_tables + seq * index.max_blocks;
    keys = gather_blocks(kv_cache.select(0, 0), table, num_blocks, block_size, seq_len);
    values = gather_blocks(kv_cache.select(0, 1), table, num_blocks, block_size, seq_len);
  }
  // Row i (position seq_len - query_len + i) sees keys up to its own position.
  at::Tensor rows = at::arange(query_len, at::kLong).unsqueeze(1).add(seq_len - query_len);
  at::Tensor is_future = at::arange(seq_len, at::kLong).unsqueeze(0).gt(rows);
  bias = at::zeros({query_len, seq_len}, query.options())
             .masked_fill_(is_future, -std::numeric_limits<double>::infinity())
             .repeat({group, 1});
  at::Tensor output = at::scaled_dot_product_attention(grouped, keys, values, bias, 0.0,
                                                       false, scale);
  // [1, KV, g * T, D] -> [T, KV * g * D]
  out.narrow(0, start, query_len)
      .copy_(output.view({num_kv_heads, group, query_len, head_dim})
                 .permute({2, 0, 1, 3})
                 .reshape({query_len, num_heads * head_dim}));
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, at::Tensor kv_cache,
                           const at::Tensor& metadata, int64_t block_size, double scale) {
  const StepIndex index = parse_step_index(metadata);
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "query, key and value must be [T, heads, D]");
  TORCH_CHECK(query.size(0) == index.num_tokens, "query has ", query.size(0),
              " rows, metadata says ", index.num_tokens);
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() &&
                  kv_cache.size(1) % block_size == 0,
              "kv_cache must be a contiguous [2, num_blocks * block_size, KV, D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  key.scalar_type() == kv_cache.scalar_type(),
              "query, key, value and kv_cache must share a dtype");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query heads must be a multiple of KV heads");
  at::Tensor out = at::empty({index.num_tokens, query.size(1) * query.size(2)}, query.options());
  auto write_and_decode = [&](auto zero) {
    using scalar_t = decltype(zero);
    write_cache<scalar_t>(key, value, kv_cache, index);
    if (index.num_decodes > 0) {
      const DecodeArgs<scalar_t> args{rows_of<scalar_t>(query),
                                      {out.data_ptr<scalar_t>(), out.stride(0)},
                                      kv_cache.data_ptr<scalar_t>(),
                                      kv_cache.size(1),
                                      query.size(1),
                                      kv_cache.size(2),
                                      query.size(2),
                                      block_size,
                                      scale};
      decode_rows<scalar_t>(args, index);
    }
  };
  switch (query.scalar_type()) {
    case at::kFloat: write_and_decode(float{}); break;
    case at::kBFloat16: write_and_decode(at::BFloat16{}); break;
    case at::kHalf: write_and_decode(at::Half{}); break;
    default: TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16");
  }
  for (int64_t seq = index.num_decodes; seq < index.num_seqs; ++seq) {
    prefill_attention(query, key, value, kv_cache, out, index, seq, block_size, scale);
  }
  return out;
}

}  // namespace

// The schema is defined in Python (serving/kernels/ops.py, with its fake implementation);
// this library only adds the CPU kernel.
TORCH_LIBRARY_IMPL(quiver, CPU, m) { m.impl("paged_attention", &paged_attention); }

}  // namespace quiver
