// Paged attention for the native engine on CPU: one op per layer and step.
//
//   quiver::paged_attention(query [T, H, D], key [T, KV, D], value [T, KV, D],
//                           kv_cache [2, num_slots, KV, D] (mutated), metadata int64 [L],
//                           block_size, scale) -> [T, H * D]
//
// It writes the step's K/V into their cache slots, then attends. The flat batch holds
// decodes first (one query row each), then prefill chunks. Once a chunk's K/V are in the
// cache, its row i is a decode over its request's positions up to its own (context + i + 1),
// so every row of the step, decode or prefill, goes through one kernel that reads keys and
// values in place, block by block, with no gather: one task per (row, KV head) serves the
// H / KV query heads that share that KV head (GQA), in float32 (paged_decode.cpp). For
// prefill this replaced ATen's SDPA over each chunk (with a causal mask, its cached context
// gathered first): on SmolLM2's heads in bf16 (2-core Zen 4) 16 fresh chunks of 128 rows
// took 2.7 ms a layer against 11.2, one of 2,048 rows 35 against 76 ms, 2,048 rows after a
// 2,048-token context 106 against 184 ms — SDPA's work grows with the square of the chunk
// as this does, and it spent more per position on 128-row chunks.
//
// `metadata` packs every per-step index into one tensor so a compiled graph sees a single
// dynamic size (see serving/models/attention.py, which builds it):
//   [num_tokens, num_seqs, max_blocks, num_decodes,
//    slot_mapping[num_tokens], query_start[num_seqs + 1], seq_lens[num_seqs],
//    block_tables[num_seqs * max_blocks]]


#include "paged_attention.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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
  // Every query row, decode or prefill, attends to its request's positions up to its own.
  // The kernel reads rows and blocks through raw pointers: the index is checked first.
  TORCH_CHECK(index.num_seqs == 0 || (index.query_start[0] == 0 &&
                                      index.query_start[index.num_seqs] == index.num_tokens),
              "query_start must run from 0 to the step's ", index.num_tokens, " tokens");
  const int64_t num_blocks = kv_cache.size(1) / block_size;
  std::vector<CachedQuery> rows;
  rows.reserve(index.num_tokens);
  for (int64_t seq = 0; seq < index.num_seqs; ++seq) {
    const int64_t start = index.query_start[seq];
    const int64_t query_len = index.query_start[seq + 1] - start;
    const int64_t context = index.seq_lens[seq] - query_len;  // positions before the chunk
    const int64_t used_blocks = (index.seq_lens[seq] + block_size - 1) / block_size;
    TORCH_CHECK(query_len >= 0 && context >= 0 && used_blocks <= index.max_blocks,
                "request ", seq, " has ", query_len, " query rows and ", index.seq_lens[seq],
                " positions in ", index.max_blocks, " blocks of ", block_size);
    const int64_t* table = index.block_tables + seq * index.max_blocks;
    for (int64_t b = 0; b < used_blocks; ++b) {
      TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "request ", seq, "'s block ",
                  table[b], " is outside the cache's ", num_blocks, " blocks");
    }
    for (int64_t i = 0; i < query_len; ++i) rows.push_back({start + i, context + i + 1, table});
  }
  auto write_and_attend = [&](auto zero) {
    using scalar_t = decltype(zero);
    write_cache<scalar_t>(key, value, kv_cache, index);
    if (!rows.empty()) {
      const DecodeArgs<scalar_t> args{rows_of<scalar_t>(query),
                                      {out.data_ptr<scalar_t>(), out.stride(0)},
                                      kv_cache.data_ptr<scalar_t>(),
                                      kv_cache.size(1),
                                      query.size(1),
                                      kv_cache.size(2),
                                      query.size(2),
                                      block_size,
                                      scale};
      attend_cached<scalar_t>(args, rows.data(), static_cast<int64_t>(rows.size()));
    }
  };
  switch (query.scalar_type()) {
    case at::kFloat: write_and_attend(float{}); break;
    case at::kBFloat16: write_and_attend(at::BFloat16{}); break;
    case at::kHalf: write_and_attend(at::Half{}); break;
    default: TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16");
  }
  return out;
}

}  // namespace

// The schema is defined in Python (serving/kernels/ops.py, with its fake implementation);
// this library only adds the CPU kernel.
TORCH_LIBRARY_IMPL(quiver, CPU, m) { m.impl("paged_attention", &paged_attention); }

}  // namespace quiver
