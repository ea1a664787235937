// Shared by the paged-attention op (paged_attention.cpp) and its decode kernel
// (paged_decode.cpp): the packed step index and row views of [T, heads, D] tensors.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace quiver {

constexpr int64_t kHeaderSize = 4;

struct StepIndex {
  int64_t num_tokens, num_seqs, max_blocks, num_decodes;
  const int64_t* slot_mapping;
  const int64_t* query_start;
  const int64_t* seq_lens;
  const int64_t* block_tables;

  static StepIndex parse(const at::Tensor& metadata) {
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
};

// Row `t` of a [T, heads, D] tensor whose heads are contiguous rows of D.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t row_stride;
  scalar_t* row(int64_t t) const { return data + t * row_stride; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              "attention inputs need contiguous heads");
  return {x.data_ptr<scalar_t>(), x.stride(0)};
}


// Decode rows (the first `index.num_decodes` query rows) attending to their cached K/V in
// place; writes their rows of `out` [T, H * D]. Defined for float, BFloat16 and Half.
template <typename scalar_t>
void decode_rows(const at::Tensor& query, const at::Tensor& kv_cache, at::Tensor& out,
                 const StepIndex& index, int64_t block_size, double scale);

}  // namespace quiver
