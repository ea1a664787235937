// quiver::linear over one or two rows (packed_linear.cpp tries it first), at the speed of
// reading the weight once from memory.
//
// At batch 1 a decode step is a chain of matrix-vector products: every weight byte is read
// once and used for one multiply-add per row, so the step costs what streaming the weights
// from memory costs. oneDNN's GEMM, built for many rows, reads them at about half this
// host's bandwidth at one row (SmolLM2's gate/up projection: 24 GB/s against 46 GB/s for a
// plain sum over the same bytes, 2-core Zen 4). Here each thread streams one contiguous run
// of weight rows, in order, and every row of x (in L1) meets each 32-value chunk of them as
// it passes: one AVX512-BF16 dot-product instruction a chunk and row where the CPU has it,
// else the two halves of each bf16 pair widened to float32 and multiply-added.
// Sums are float32 and rounded to bf16 once, at the end, as oneDNN does. Three to eight rows
// are no faster than oneDNN here (each weight chunk then costs as many dot products as rows,
// and the LM head ran slower), so past kSkinnyMaxRows oneDNN keeps them. Header-only: it
// compiles with packed_linear.cpp, not as one more pass over torch's headers at a cold start.

#pragma once

#include "linear_io.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace quiver {

// The most rows `skinny_linear` takes.
constexpr int64_t kSkinnyMaxRows = 2;

// The most rows it takes now: kSkinnyMaxRows unless quiver::set_skinny_max_rows lowered it
// (0 sends every call to oneDNN: benchmarks/engine_steps.py's A/B, a suspected kernel).
inline std::atomic<int64_t>& skinny_rows_limit() {
  static std::atomic<int64_t> limit{kSkinnyMaxRows};
  return limit;
}

namespace skinny_detail {

#if defined(__AVX512F__) && defined(__AVX512BW__)  // BW: the 16-bit masked loads
constexpr int64_t kChunk = 32;  // bf16 values in one 512-bit register

// acc's lanes += the products of 32 bf16 values of x and w, summed in pairs.
inline __m512 dot_chunk(__m512 acc, __m512i x, __m512i w) {
#if defined(__AVX512BF16__)
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(w));
#else
  // A bf16 is the top half of a float32: the odd values keep their place under a mask,
  // the even ones move up 16 bits.
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                        _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x, high)),
                         _mm512_castsi512_ps(_mm512_and_si512(w, high)), acc);
#endif
}

// out[m] = x[m] . w (+ bias) for M rows of x and one row of w. The weight is read strictly
// in order, row after row: four rows at a time, a pass would jump between four short runs
// that the hardware prefetcher never learns (it ran at a third of the bandwidth). Four
// accumulators a row of x take alternate chunks, so no chain of dependent instructions
// sets the pace; every index into them is a compile-time constant, so they stay in
// registers (a loop-variable index put them in memory: 2x slower at four rows).
template <int M>
inline void dot_row(const uint16_t* x, const uint16_t* w, int64_t k_size, float bias,
                    c10::BFloat16* out, int64_t out_stride) {
  constexpr int kAccumulators = 4;
  __m512 acc[M][kAccumulators];
#pragma GCC unroll 2
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int a = 0; a < kAccumulators; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kAccumulators * kChunk <= k_size; k += kAccumulators * kChunk) {
#pragma GCC unroll 4
    for (int a = 0; a < kAccumulators; ++a) {
      const __m512i wv = _mm512_loadu_si512(w + k + a * kChunk);
#pragma GCC unroll 2
      for (int m = 0; m < M; ++m) {
        acc[m][a] = dot_chunk(acc[m][a], _mm512_loadu_si512(x + m * k_size + k + a * kChunk),
                              wv);
      }
    }
  }
  for (; k < k_size; k += kChunk) {  // the last chunks; masked loads read zeros past the end
    const int64_t left = std::min<int64_t>(kChunk, k_size - k);
    const __mmask32 mask = left == kChunk ? ~0u : (1u << left) - 1u;
    const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + k);
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m) {
      acc[m][0] = dot_chunk(acc[m][0], _mm512_maskz_loadu_epi16(mask, x + m * k_size + k), wv);
    }
  }
#pragma GCC unroll 2
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[m][0];
#pragma GCC unroll 4
    for (int a = 1; a < kAccumulators; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
    out[m * out_stride] = c10::BFloat16(_mm512_reduce_add_ps(sum) + bias);  // nearest even
  }
}

template <int M>
inline void skinny_rows(const uint16_t* x, const uint16_t* w, const float* bias,
                        c10::BFloat16* out, int64_t n_size, int64_t k_size) {
  // At least 64 rows a task, so a thread streams a long contiguous run of the weight.
  at::parallel_for(0, n_size, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      dot_row<M>(x, w + n * k_size, k_size, bias ? bias[n] : 0.0f, out + n, n_size);
    }
  });
}
#endif  // __AVX512F__ && __AVX512BW__

}  // namespace skinny_detail

// `x [..., K] @ weight[N, K]^T + bias` where it applies — bf16 x, weight and bias, a
// contiguous weight, at most kSkinnyMaxRows rows, a CPU with AVX-512 — else nullopt.
inline std::optional<at::Tensor> skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (x.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16 ||
      weight.dim() != 2 || !weight.is_contiguous() || x.dim() < 1 ||
      x.size(-1) != weight.size(1) || x.device() != weight.device() || !x.device().is_cpu()) {
    return std::nullopt;
  }
  const int64_t n_size = weight.size(0), k_size = weight.size(1);
  if (bias && bias->defined() &&
      (bias->scalar_type() != at::kBFloat16 || bias->numel() != n_size)) {
    return std::nullopt;
  }
  const int64_t rows = x.numel() / std::max<int64_t>(k_size, 1);
  if (rows < 1 || rows > skinny_rows_limit().load(std::memory_order_relaxed) || k_size == 0) {
    return std::nullopt;
  }
  using namespace skinny_detail;
  const Bf16Rows x_rows = bf16_rows(x, k_size);
  const std::vector<float> bias_f32 = bias_floats(bias, n_size);
  at::Tensor out = linear_output(x, n_size);
  const auto* w_data = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
  const float* b_data = bias_f32.empty() ? nullptr : bias_f32.data();
  c10::BFloat16* o_data = out.data_ptr<c10::BFloat16>();
  static_assert(kSkinnyMaxRows == 2, "one instantiation per row count");
  if (rows == 1) {
    skinny_rows<1>(x_rows.data, w_data, b_data, o_data, n_size, k_size);
  } else {
    skinny_rows<2>(x_rows.data, w_data, b_data, o_data, n_size, k_size);
  }
  return out;
#else
  (void)x, (void)weight, (void)bias;
  return std::nullopt;
#endif
}

}  // namespace quiver
