// quiver::row_argmax(logits [N, V] float32) -> int64 [N]: each row's index of its largest
// value, as torch.argmax(-1) answers it — the first index where the maximum appears, and a
// NaN's index where a row holds one (torch reads NaN as the largest value; the sampler
// looks for it). Greedy sampling's one reduction over the vocabulary: torch's argmax took
// 0.66 ms over 32 x 49,152 logits on a 2-core Zen 4 (≈ 1.5 % of a decode step at 32
// requests); here each thread scans its rows 16 lanes at a time (8 with AVX2 only), every
// lane keeping its first maximum, and the lanes agree at the end. Header-only: it compiles with
// packed_linear.cpp, not as one more compiler run at a cold start.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <limits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace quiver {
namespace argmax_detail {

// The first index of a NaN, else of the first maximum, in one scalar pass.
inline int64_t scalar_argmax(const float* row, int64_t size) {
  int64_t best = 0;
  for (int64_t i = 0; i < size; ++i) {
    if (std::isnan(row[i])) return i;
    if (row[i] > row[best]) best = i;
  }
  return best;
}

inline int64_t row_argmax(const float* row, int64_t size) {
#if defined(__AVX512F__)
  if (size < 16 || size > std::numeric_limits<int32_t>::max()) return scalar_argmax(row, size);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 best = minus_inf;
  __m512i best_index = _mm512_setzero_si512();
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < size; i += 16, index = _mm512_add_epi32(index, step)) {
    const int64_t left = size - i;
    const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 values = _mm512_mask_loadu_ps(minus_inf, valid, row + i);  // -inf past the end
    nan |= _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    const __mmask16 greater = _mm512_cmp_ps_mask(values, best, _CMP_GT_OQ);  // strictly: first wins
    best = _mm512_mask_mov_ps(best, greater, values);
    best_index = _mm512_mask_mov_epi32(best_index, greater, index);
  }
  if (nan) return scalar_argmax(row, size);
  const float maximum = _mm512_reduce_max_ps(best);
  const __mmask16 at_maximum = _mm512_cmp_ps_mask(best, _mm512_set1_ps(maximum), _CMP_EQ_OQ);
  // Lanes hold interleaved positions: among the lanes at the maximum, the smallest index.
  const __m512i candidates =
      _mm512_mask_mov_epi32(_mm512_set1_epi32(std::numeric_limits<int32_t>::max()), at_maximum,
                            best_index);
  return _mm512_reduce_min_epi32(candidates);
#elif defined(__AVX2__)
  // 8 lanes; the last size % 8 values go through the scalar rule after the lanes agree
  // (their indices are larger, so only a strictly greater value takes over).
  if (size < 8 || size > std::numeric_limits<int32_t>::max()) return scalar_argmax(row, size);
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256i best_index = _mm256_setzero_si256();
  __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= size; i += 8, index = _mm256_add_epi32(index, step)) {
    const __m256 values = _mm256_loadu_ps(row + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(values, values, _CMP_UNORD_Q));
    const __m256 greater = _mm256_cmp_ps(values, best, _CMP_GT_OQ);  // strictly: first wins
    best = _mm256_blendv_ps(best, values, greater);
    best_index = _mm256_blendv_epi8(best_index, index, _mm256_castps_si256(greater));
  }
  if (_mm256_movemask_ps(nan)) return scalar_argmax(row, size);
  alignas(32) float lane_best[8];
  alignas(32) int32_t lane_index[8];
  _mm256_store_ps(lane_best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_index), best_index);
  int64_t answer = lane_index[0];
  float maximum = lane_best[0];
  for (int lane = 1; lane < 8; ++lane) {  // lanes hold interleaved positions
    if (lane_best[lane] > maximum ||
        (lane_best[lane] == maximum && lane_index[lane] < answer)) {
      maximum = lane_best[lane];
      answer = lane_index[lane];
    }
  }
  for (; i < size; ++i) {
    if (std::isnan(row[i])) return i;
    if (row[i] > maximum) maximum = row[i], answer = i;
  }
  return answer;
#else
  return scalar_argmax(row, size);
#endif
}

}  // namespace argmax_detail

inline at::Tensor row_argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() &&
                  logits.size(1) > 0,
              "row_argmax: logits must be a contiguous float32 [rows, vocab] with vocab > 0");
  const int64_t rows = logits.size(0), size = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = logits.data_ptr<float>();
  int64_t* indices = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      indices[r] = argmax_detail::row_argmax(data + r * size, size);
    }
  });
  return out;
}

}  // namespace quiver
