// What Quiver's own linear kernels (skinny_linear.h, tile_linear.h, lowbit_linear.h,
// lowbit_float.h) share: bf16 rows of x in, a float32 bias, the output in x's dtype, rows
// taken in blocks, a row's feature pair broadcast for AVX512-BF16 dot products.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace quiver {

// `x [..., K]` as contiguous `[rows, K]` values (`tensor` keeps them alive): bf16 as their
// bits (`bf16_rows`), or float32 (`float_rows`).
template <class T>
struct Rows {
  at::Tensor tensor;
  const T* data;
  int64_t rows;
};
using Bf16Rows = Rows<uint16_t>;

inline Bf16Rows bf16_rows(const at::Tensor& x, int64_t k_size) {
  at::Tensor rows = x.reshape({-1, k_size}).contiguous();
  const auto* data = reinterpret_cast<const uint16_t*>(rows.data_ptr<c10::BFloat16>());
  return {rows, data, rows.size(0)};
}

inline Rows<float> float_rows(const at::Tensor& x, int64_t k_size) {
  at::Tensor rows = x.reshape({-1, k_size}).contiguous();
  return {rows, rows.data_ptr<float>(), rows.size(0)};
}

// A bf16 `bias` of `n_size` values as float32; empty when there is none.
inline std::vector<float> bias_floats(const std::optional<at::Tensor>& bias, int64_t n_size) {
  std::vector<float> values;
  if (bias && bias->defined()) {
    const at::Tensor b = bias->contiguous();
    const c10::BFloat16* data = b.data_ptr<c10::BFloat16>();
    values.assign(data, data + n_size);
  }
  return values;
}

// The uninitialised `[..., N]` output of a linear layer over `x [..., K]`.
inline at::Tensor linear_output(const at::Tensor& x, int64_t n_size) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n_size;
  return at::empty(sizes, x.options());
}

// `block(std::integral_constant<int, B>{}, m)` over rows [0, rows): blocks of kLargest rows,
// then at most one each of kLargest / 2, ..., 1 for the rest.
template <int kBlock, class Block>
inline void remaining_row_blocks(int64_t rows, int64_t m, Block& block) {
  if (m + kBlock <= rows) {
    block(std::integral_constant<int, kBlock>{}, m);
    m += kBlock;
  }
  if constexpr (kBlock > 1) remaining_row_blocks<kBlock / 2>(rows, m, block);
}
template <int kLargest, class Block>
inline void for_row_blocks(int64_t rows, Block&& block) {
  int64_t m = 0;
  for (; m + kLargest <= rows; m += kLargest) block(std::integral_constant<int, kLargest>{}, m);
  remaining_row_blocks<kLargest / 2>(rows, m, block);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Features 2p and 2p + 1 of a bf16 row (`x` points at them) in every 32-bit lane.
inline __m512bh broadcast_pair(const uint16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
}
#endif

}  // namespace quiver
