// Shared by the paged-attention op (paged_attention.cpp) and its decode kernel
// (paged_decode.cpp): the packed step index, row views of [T, heads, D] data and the decode
// kernel's entry point. Plain pointers only: this header (unlike ATen's Tensor.h, which costs
// a compile unit ~4 s at a cold start) is all paged_decode.cpp's three builds parse.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace quiver {

constexpr int64_t kHeaderSize = 4;

// The per-step index packed in the op's int64 metadata (paged_attention.cpp parses it).
struct StepIndex {
  int64_t num_tokens, num_seqs, max_blocks, num_decodes;
  const int64_t* slot_mapping;
  const int64_t* query_start;
  const int64_t* seq_lens;
  const int64_t* block_tables;
};

// Row `t` of a [T, heads, D] tensor whose heads are contiguous rows of D.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t row_stride;
  scalar_t* row(int64_t t) const { return data + t * row_stride; }
};

// What the decode kernel reads and writes: the query rows, one layer's cache
// `[2, num_slots, num_kv_heads, head_dim]` and the output rows `[T, num_heads * head_dim]`.
template <typename scalar_t>
struct DecodeArgs {
  Rows<scalar_t> query, out;
  const scalar_t* kv_cache;
  int64_t num_slots, num_heads, num_kv_heads, head_dim, block_size;
  double scale;
};

// One query row attending to the first `seq_len` cached positions of its request, whose
// block ids are `table`: a decode row, or a row of a prefill chunk (its own K/V are in the
// cache by then, so row i of a chunk is a decode over the positions up to its own).
struct CachedQuery {
  int64_t row, seq_len;
  const int64_t* table;
};

// Each of `count` query rows attending to its cached K/V in place; writes its row of `out`.
// Defined for float, BFloat16 and Half.
template <typename scalar_t>
void attend_cached(const DecodeArgs<scalar_t>& args, const CachedQuery* queries, int64_t count);

}  // namespace quiver
