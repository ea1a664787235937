// quiver::linear for float32 rows on a float32 weight that holds bf16 numbers — a bf16
// checkpoint served in float32 because the CPU has no native bf16 (AVX2 only: there
// `--dtype auto` picks float32) — on a bf16 copy of the weight laid out once at load
// (packed_linear.cpp keeps it as the plain weight's twin):
//
//   panel_pack(weight [N, K] float32, every value a bf16) -> [N/16, K, 16] bf16
//   panel_linear(x [..., K] float32, packed, bias? [N] float32) -> [..., N] float32
//
// Upcasting a bf16 checkpoint to float32 is exact, so the bf16 copy is the same weight in
// half the bytes: a decode step, which streams every weight from memory, reads half as much,
// and each product is the float32 product oneDNN's float32 GEMM would form. The weight is a
// sequence of panels of 16 output columns, each input feature's 16 values together (32
// bytes); interleaving a feature's values with zeros turns them into two registers of
// float32 in one instruction each (the columns are stored in the order that makes those two
// registers columns 0-7 and 8-15). A block of up to 4 rows keeps its 4 x 16 sums in 8
// registers: per feature one weight load and two widenings feed 8 multiply-adds, each row's
// feature broadcast once. One or two rows split the features between two sets of sums, so
// no chain of dependent multiply-adds sets the pace while the weight streams. A panel (K x 32
// bytes: 18 KB at K = 576) stays in L1 while the row blocks pass over it; rows go in chunks of
// 64 so the chunk of x stays in L2; threads split the panels, each reading a contiguous run
// of the packed weight. Sums are float32 in feature order per row (two halves at one or two
// rows), the bias added last. Built only where the CPU has AVX2 but not AVX-512: there
// `auto` picks bf16 (oneDNN has bf16 kernels), and oneDNN's float32 GEMM with twice the
// vector width was not measured against this kernel.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define QUIVER_PANELS 1
#include <immintrin.h>
#endif

namespace quiver {

constexpr int64_t kPanelColumns = 16;  // output columns a panel: two AVX2 registers of sums

// Whether `panel_pack` takes this weight: float32 [N, K], N a multiple of 16, every value a
// bf16 number (its low 16 bits zero), on a CPU the kernel was built for (AVX2, no AVX-512).
inline bool panel_packable(const at::Tensor& weight) {
#if defined(QUIVER_PANELS)
  if (weight.scalar_type() != at::kFloat || weight.dim() != 2 || !weight.device().is_cpu() ||
      weight.size(0) == 0 || weight.size(0) % kPanelColumns != 0 || weight.size(1) == 0) {
    return false;
  }
  return weight.contiguous().view(at::kInt).bitwise_and(0xFFFF).eq(0).all().item<bool>();
#else
  (void)weight;
  return false;
#endif
}

// [N, K] float32 -> [N/16, K, 16] bf16: panel b, feature k holds columns 16b + {0-3, 8-11,
// 4-7, 12-15}: the order in which widening a feature's 16 values (two interleavings with
// zeros, each within 128-bit halves) yields columns 0-7 in one register and 8-15 in the other.
inline at::Tensor panel_pack(const at::Tensor& weight) {
  TORCH_CHECK(panel_packable(weight), "panel_pack: needs a float32 [N, K] weight of bf16 values, "
              "N % 16 == 0, on an AVX2 CPU without AVX-512");
  const int64_t n_size = weight.size(0), k_size = weight.size(1);
  // column 8h + 4q + i (halves h, quarters q) goes to place 8q + 4h + i
  return weight.to(at::kBFloat16)
      .contiguous()
      .view({n_size / kPanelColumns, 2, 2, 4, k_size})
      .permute({0, 4, 2, 1, 3})
      .contiguous()
      .view({n_size / kPanelColumns, k_size, kPanelColumns});
}

// Whether `panel_linear` takes these operands (else the caller keeps another path).
inline bool panel_applies(const at::Tensor& x, const at::Tensor& packed,
                          const std::optional<at::Tensor>& bias) {
  const int64_t n_size = packed.size(0) * kPanelColumns;
  return x.scalar_type() == at::kFloat && x.dim() >= 1 && x.device().is_cpu() &&
         x.size(-1) == packed.size(1) &&
         (!bias || !bias->defined() ||
          (bias->scalar_type() == at::kFloat && bias->numel() == n_size));
}

namespace panel_detail {

#if defined(QUIVER_PANELS)
constexpr int64_t kChunkRows = 64;  // rows of x kept in cache while the panels pass

// out rows [0, R) (`out_stride` apart), columns of one panel, += nothing: written once.
// x rows are `k_size` apart; kSplit sets of sums take alternate features.
template <int R, int kSplit>
inline void panel_block(const float* x, int64_t k_size, const uint16_t* panel, const float* bias,
                        float* out, int64_t out_stride) {
  const __m256i zero = _mm256_setzero_si256();
  __m256 acc[kSplit][R][2];
  for (int s = 0; s < kSplit; ++s)
    for (int r = 0; r < R; ++r) acc[s][r][0] = acc[s][r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kSplit <= k_size; k += kSplit) {
#pragma GCC unroll 2
    for (int s = 0; s < kSplit; ++s) {
      const __m256i w = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(panel + (k + s) * kPanelColumns));
      const __m256 low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w));
      const __m256 high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * k_size + k + s);
        acc[s][r][0] = _mm256_fmadd_ps(xv, low, acc[s][r][0]);
        acc[s][r][1] = _mm256_fmadd_ps(xv, high, acc[s][r][1]);
      }
    }
  }
  for (; k < k_size; ++k) {  // an odd last feature when the features alternate
    const __m256i w =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kPanelColumns));
    const __m256 low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w));
    const __m256 high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * k_size + k);
      acc[0][r][0] = _mm256_fmadd_ps(xv, low, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(xv, high, acc[0][r][1]);
    }
  }
  const __m256 bias_low = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 bias_high = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    __m256 low = acc[0][r][0], high = acc[0][r][1];
    for (int s = 1; s < kSplit; ++s) {
      low = _mm256_add_ps(low, acc[s][r][0]);
      high = _mm256_add_ps(high, acc[s][r][1]);
    }
    _mm256_storeu_ps(out + r * out_stride, _mm256_add_ps(low, bias_low));
    _mm256_storeu_ps(out + r * out_stride + 8, _mm256_add_ps(high, bias_high));
  }
}

// Rows [0, rows) of x through one panel: blocks of 4, then 2 and 1. A call of one or two
// rows in all (`alone`) splits their features in two (memory-bound: the weight streams,
// nothing else waits); any other call keeps one chain per column, so a row's sums do not
// depend on which rows share its call.
inline void panel_rows(const float* x, int64_t rows, int64_t k_size, const uint16_t* panel,
                       const float* bias, float* out, int64_t n_size, bool alone) {
  if (alone && rows == 1) return panel_block<1, 2>(x, k_size, panel, bias, out, n_size);
  if (alone && rows == 2) return panel_block<2, 2>(x, k_size, panel, bias, out, n_size);
  int64_t m = 0;  // more rows a block spilled registers: 5 rows ran 1.3-1.7x slower
  for (; m + 4 <= rows; m += 4) {
    panel_block<4, 1>(x + m * k_size, k_size, panel, bias, out + m * n_size, n_size);
  }
  if (m + 2 <= rows) {
    panel_block<2, 1>(x + m * k_size, k_size, panel, bias, out + m * n_size, n_size);
    m += 2;
  }
  if (m < rows) panel_block<1, 1>(x + m * k_size, k_size, panel, bias, out + m * n_size, n_size);
}
#endif  // QUIVER_PANELS

}  // namespace panel_detail

inline at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(panel_applies(x, packed, bias), "panel_linear: needs float32 x [..., K] and bias "
              "[N] matching the packed weight");
#if defined(QUIVER_PANELS)
  const int64_t k_size = packed.size(1), n_size = packed.size(0) * kPanelColumns;
  const at::Tensor rows = x.reshape({-1, k_size}).contiguous();
  const int64_t num_rows = rows.size(0);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n_size;
  at::Tensor out = at::empty(sizes, x.options());
  if (num_rows == 0) return out;
  const at::Tensor b = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* x_data = rows.data_ptr<float>();
  const float* b_data = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto* w_data = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  float* o_data = out.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = 0; first < num_rows; first += panel_detail::kChunkRows) {
      const int64_t count = std::min(panel_detail::kChunkRows, num_rows - first);
      for (int64_t p = begin; p < end; ++p) {
        panel_detail::panel_rows(x_data + first * k_size, count, k_size,
                                 w_data + p * k_size * kPanelColumns,
                                 b_data ? b_data + p * kPanelColumns : nullptr,
                                 o_data + first * n_size + p * kPanelColumns, n_size,
                                 num_rows <= 2);
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "panel_linear is built for CPUs with AVX2 and FMA but not AVX-512");
#endif
}

}  // namespace quiver
