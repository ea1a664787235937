// quiver::linear from three rows up on a bf16 weight laid out once, at load, for AVX512-BF16
// dot products (packed_linear.cpp keeps it as the plain weight's twin):
//
//   tile_pack(weight [N, K] bf16) -> [N/32, K/2, 64] bf16
//   tile_linear(x [..., K] bf16, packed, bias? [N] bf16) -> [..., N] bf16
//
// A decode step of 3 to 64 requests multiplies a few dozen rows by every weight. oneDNN's
// GEMM, tuned for many rows, ran SmolLM2's projections there at 190-400 GFLOP/s on a 2-core
// Zen 4, while this host's dot-product instruction allows about 460 (what oneDNN reaches at
// 512+ rows). Here the weight is a sequence of blocks of 32 output columns; within a block,
// each input-feature pair's 32 column pairs sit together (64 bf16: two registers). A block
// of up to 8 rows keeps its 8 x 32 column sums in 16 registers; each feature pair costs two
// weight loads and, per row, one broadcast of the row's pair feeding two dot products, so the
// loop is bound by the dot products, not by loads. A block's weight (K x 64 bytes: 36 KB at
// K = 576) stays in L2 while every row block passes over it; rows go in chunks of 256 so the
// chunk of x stays in cache across the blocks. Threads split the column blocks: each one
// reads a contiguous run of the packed weight.
//
// Measured against oneDNN on its reordered weight (`benchmarks/linear_kernels.py`, 2-core Zen 4
// with AVX512-BF16): 0.5-0.9x its time at 8 to 32 rows on SmolLM2's shapes, about even at
// 512 and 2,048. Every row's sums run in one chain per column, in feature order, whatever
// rows share its call: a row's result does not depend on the batch it came in. Sums are
// float32, the bias is added to them, and each is rounded to bf16 once. One or two rows
// stay with skinny_linear.h (a block then has too few independent sums to keep the dot
// product unit busy).

#pragma once

#include "linear_io.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace quiver {

constexpr int64_t kTileColumns = 32;  // output columns a block: two registers of float sums

// Whether `tile_pack` takes this weight: bf16 [N, K] with N a multiple of 32 and K even, on a
// CPU the kernel was built for (the library's -march: the CPU's own unless
// QUIVER_KERNEL_MARCH names another).
inline bool tile_packable(const at::Tensor& weight) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.device().is_cpu() &&
         weight.size(0) > 0 && weight.size(0) % kTileColumns == 0 && weight.size(1) > 0 &&
         weight.size(1) % 2 == 0;
#else
  (void)weight;
  return false;
#endif
}

// [N, K] -> [N/32, K/2, 64]: block b, feature pair p holds column j's features 2p, 2p + 1 at
// 2j and 2j + 1.
inline at::Tensor tile_pack(const at::Tensor& weight) {
  TORCH_CHECK(tile_packable(weight), "tile_pack: needs a bf16 [N, K] weight, N % 32 == 0, K even, "
              "on an AVX512-BF16 CPU");
  const int64_t n_size = weight.size(0), k_size = weight.size(1);
  return weight.contiguous()
      .view({n_size / kTileColumns, kTileColumns, k_size / 2, 2})
      .permute({0, 2, 1, 3})
      .contiguous()
      .view({n_size / kTileColumns, k_size / 2, 2 * kTileColumns});
}

// Whether `tile_linear` takes these operands (else the caller keeps another path).
inline bool tile_applies(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias) {
  const int64_t n_size = packed.size(0) * kTileColumns;
  return x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.device().is_cpu() &&
         x.size(-1) == 2 * packed.size(1) &&
         (!bias || !bias->defined() ||
          (bias->scalar_type() == at::kBFloat16 && bias->numel() == n_size));
}

namespace tile_detail {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr int64_t kChunkRows = 256;  // rows of x kept in cache while every block passes

// acc[m][0..2) = the 32 column sums of x[m] . block over feature pairs [first, end), for M
// rows of x; `block` is [K/2, 64] bf16 in the packed layout (lowbit_linear.h widens its
// low-bit tiles into it).
template <int M>
inline void pair_sums(const uint16_t* x, int64_t k_size, const uint16_t* block, int64_t first,
                      int64_t end, __m512 (&acc)[M][2]) {
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t p = first; p < end; ++p) {
    const __m512bh low = reinterpret_cast<__m512bh>(_mm512_loadu_si512(block + p * 64));
    const __m512bh high = reinterpret_cast<__m512bh>(_mm512_loadu_si512(block + p * 64 + 32));
    for (int m = 0; m < M; ++m) {
      const __m512bh pair = broadcast_pair(x + m * k_size + 2 * p);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], pair, low);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], pair, high);
    }
  }
}

// out[m][0..32) = (x[m] . block's columns) (* scale) (+ bias) for M rows of x.
template <int M>
inline void block_rows(const uint16_t* x, int64_t k_size, const uint16_t* block,
                       const float* scale, const float* bias, c10::BFloat16* out,
                       int64_t out_stride) {
  __m512 acc[M][2];
  pair_sums<M>(x, k_size, block, 0, k_size / 2, acc);
  const __m512 scale_low = scale ? _mm512_loadu_ps(scale) : _mm512_set1_ps(1.0f);
  const __m512 scale_high = scale ? _mm512_loadu_ps(scale + 16) : _mm512_set1_ps(1.0f);
  const __m512 bias_low = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias_high = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) {
    const __m256bh low = _mm512_cvtneps_pbh(_mm512_fmadd_ps(acc[m][0], scale_low, bias_low));
    const __m256bh high =
        _mm512_cvtneps_pbh(_mm512_fmadd_ps(acc[m][1], scale_high, bias_high));
    std::memcpy(out + m * out_stride, &low, sizeof(low));  // nearest even
    std::memcpy(out + m * out_stride + 16, &high, sizeof(high));
  }
}

// Every row of a chunk (`rows` of x from `x`) against one block, in blocks of 8 rows.
inline void chunk_rows(const uint16_t* x, int64_t rows, int64_t k_size, const uint16_t* block,
                       const float* scale, const float* bias, c10::BFloat16* out,
                       int64_t out_stride) {
  for_row_blocks<8>(rows, [&](auto size, int64_t m) {
    block_rows<decltype(size)::value>(x + m * k_size, k_size, block, scale, bias,
                                      out + m * out_stride, out_stride);
  });
}
#endif  // __AVX512BF16__ && __AVX512BW__

}  // namespace tile_detail

inline at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& packed,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 &&
                  packed.size(2) == 2 * kTileColumns && packed.is_contiguous(),
              "tile_linear: packed must be a contiguous bf16 [N/32, K/2, 64]");
  TORCH_CHECK(tile_applies(x, packed, bias), "tile_linear: x must be bf16 [..., ",
              2 * packed.size(1), "], bias bf16 [", packed.size(0) * kTileColumns, "]");
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  using namespace tile_detail;
  const int64_t n_size = packed.size(0) * kTileColumns, k_size = 2 * packed.size(1);
  const Bf16Rows x_rows = bf16_rows(x, k_size);
  const std::vector<float> bias_f32 = bias_floats(bias, n_size);
  at::Tensor out = linear_output(x, n_size);
  const auto* w_data = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  const float* b_data = bias_f32.empty() ? nullptr : bias_f32.data();
  c10::BFloat16* o_data = out.data_ptr<c10::BFloat16>();
  const int64_t block_size = packed.size(1) * 2 * kTileColumns;
  for (int64_t first = 0; first < x_rows.rows; first += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, x_rows.rows - first);
    const uint16_t* x_chunk = x_rows.data + first * k_size;
    at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t column = b * kTileColumns;
        chunk_rows(x_chunk, rows, k_size, w_data + b * block_size, nullptr,
                   b_data ? b_data + column : nullptr, o_data + first * n_size + column, n_size);
      }
    });
  }
  return out;
#else
  TORCH_CHECK(false, "tile_linear needs a CPU with AVX512-BF16");
  return at::Tensor();
#endif
}

}  // namespace quiver
