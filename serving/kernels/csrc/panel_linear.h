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
// bytes, columns j and 8 + j in one 32-bit word); a shift and a mask turn them into two
// registers of float32, columns 0-7 and 8-15. A block of up to 6 rows keeps its 6 x 16 sums
// in 12 registers: per feature one weight load and two widenings feed 12 multiply-adds, each
// row's feature broadcast once — 12 independent chains, enough to keep both FMA units busy
// through their latency (blocks of 4 rows, 8 chains, ran 32 rows at 1.2-1.3x this time and
// 512 at 1.4x). One or two rows split the features between two sets of sums, so
// no chain of dependent multiply-adds sets the pace while the weight streams. A panel (K x 32
// bytes: 18 KB at K = 576) stays in L1 while the row blocks pass over it; rows go in chunks of
// 64 so the chunk of x stays in L2; threads split the panels, each reading a contiguous run
// of the packed weight. Sums are float32 in feature order per row (two halves at one or two
// rows), the bias added last. Packed only where the library's target (-march: the CPU, or
// QUIVER_KERNEL_MARCH) has AVX2 but not AVX-512; with AVX-512 `auto` picks bf16 (oneDNN has
// bf16 kernels), and oneDNN's float32 GEMM with twice the vector width was not measured
// against this kernel.

#pragma once

#include "linear_io.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#define QUIVER_AVX2_FMA 1  // the panel sums below (also lowbit_float.h's, on any AVX2 CPU)
#include <immintrin.h>
#if !defined(__AVX512F__)
#define QUIVER_PANELS 1  // bf16 panels for float32 weights (with AVX-512, oneDNN's)
#endif
#endif

namespace quiver {

constexpr int64_t kPanelColumns = 16;  // output columns a panel: two AVX2 registers of sums

// Whether `panel_pack` takes this weight: float32 [N, K], N a multiple of 16, every value a
// bf16 number (its low 16 bits zero), in a library built for AVX2 without AVX-512.
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

// [N, K] float32 -> [N/16, K, 16] bf16: panel b, feature k holds columns 16b + j and
// 16b + 8 + j in 32-bit word j (low and high half), the order in which a shift and a mask
// widen a feature's 16 values into columns 0-7 in one register and 8-15 in the other.
inline at::Tensor panel_pack(const at::Tensor& weight) {
  TORCH_CHECK(panel_packable(weight), "panel_pack: needs a float32 [N, K] weight of bf16 values, "
              "N % 16 == 0, in a library built for AVX2 without AVX-512");
  const int64_t n_size = weight.size(0), k_size = weight.size(1);
  // column 8h + j (halves h) goes to place 2j + h
  return weight.to(at::kBFloat16)
      .contiguous()
      .view({n_size / kPanelColumns, 2, 8, k_size})
      .permute({0, 3, 2, 1})
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

#if defined(QUIVER_AVX2_FMA)
constexpr int64_t kChunkRows = 64;  // rows of x kept in cache while the panels pass

// A panel's weights as the sums below read them: `load(k, w)` turns features k to
// k + kFeatures - 1 of the panel's 16 columns into float32, w[f][0] columns 0-7 and w[f][1]
// columns 8-15, in column order (the order of the output row).
struct Bf16Panel {  // panel_pack's [K, 16] bf16
  static constexpr int kFeatures = 1;
  static constexpr int kBlockRows = 6;  // 12 registers of sums, 2 of weights, 1 broadcast
  const uint16_t* data;
  void load(int64_t k, __m256 (&w)[1][2]) const {
    const __m256i bits =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + k * kPanelColumns));
    w[0][0] = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    w[0][1] = _mm256_castsi256_ps(_mm256_and_si256(bits, high));
  }
};

// acc[s][r] += rows r of x (`k_size` apart) . the panel's columns over features [begin, end),
// in feature order; kSplit sets of sums take alternate features (a call of one or two rows:
// no chain of dependent multiply-adds sets the pace while the weight streams). R rows: up to
// 6 with one weight register pair (Bf16Panel, lowbit_float.h's F32Panel), 3 to 5 with two
// (the low-bit sources' feature pairs), to fit the 16 registers (scripts/kernel_spills.py
// finds loops that do not). Ranges that follow each other continue the same chains.
// Always inlined: a call keeps `acc` in memory, stored on every pass of the loop.
template <int R, int kSplit, class Source>
[[gnu::always_inline]] inline void panel_accumulate(const float* x, int64_t k_size,
                                                    const Source& source, int64_t begin,
                                                    int64_t end, __m256 (&acc)[kSplit][R][2]) {
  constexpr int kFeatures = Source::kFeatures;
  constexpr int kStep = kFeatures > kSplit ? kFeatures : kSplit;
  // Every loop over the sums is unrolled: one left rolled keeps them in memory (GCC 12 then
  // stores all 12 of a 6-row block every feature, at half the speed).
  int64_t k = begin;
  for (; k + kStep <= end; k += kStep) {
#pragma GCC unroll 2
    for (int j = 0; j < kStep; j += kFeatures) {
      __m256 w[kFeatures][2];
      source.load(k + j, w);
#pragma GCC unroll 2
      for (int f = 0; f < kFeatures; ++f) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_broadcast_ss(x + r * k_size + k + j + f);
          __m256(&a)[2] = acc[(j + f) % kSplit][r];
          a[0] = _mm256_fmadd_ps(xv, w[f][0], a[0]);
          a[1] = _mm256_fmadd_ps(xv, w[f][1], a[1]);
        }
      }
    }
  }
  for (; k < end; k += kFeatures) {  // an odd last feature when single features alternate
    __m256 w[kFeatures][2];
    source.load(k, w);
#pragma GCC unroll 2
    for (int f = 0; f < kFeatures; ++f) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * k_size + k + f);
        acc[0][r][0] = _mm256_fmadd_ps(xv, w[f][0], acc[0][r][0]);
        acc[0][r][1] = _mm256_fmadd_ps(xv, w[f][1], acc[0][r][1]);
      }
    }
  }
}

template <int R, int kSplit>
[[gnu::always_inline]] inline void zero_sums(__m256 (&acc)[kSplit][R][2]) {
#pragma GCC unroll 2
  for (int s = 0; s < kSplit; ++s)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[s][r][0] = acc[s][r][1] = _mm256_setzero_ps();
}

// sums[r] = the kSplit sets of sums of row r added in order.
template <int R, int kSplit>
[[gnu::always_inline]] inline void add_split_sums(const __m256 (&acc)[kSplit][R][2],
                                                  __m256 (&sums)[R][2]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    sums[r][0] = acc[0][r][0];
    sums[r][1] = acc[0][r][1];
#pragma GCC unroll 2
    for (int s = 1; s < kSplit; ++s) {
      sums[r][0] = _mm256_add_ps(sums[r][0], acc[s][r][0]);
      sums[r][1] = _mm256_add_ps(sums[r][1], acc[s][r][1]);
    }
  }
}

// sums[r] = rows r of x . the panel's columns over features [begin, end) (panel_accumulate
// from zero, the split sets added at the end).
template <int R, int kSplit, class Source>
inline void panel_sums(const float* x, int64_t k_size, const Source& source, int64_t begin,
                       int64_t end, __m256 (&sums)[R][2]) {
  __m256 acc[kSplit][R][2];
  zero_sums<R, kSplit>(acc);
  panel_accumulate<R, kSplit>(x, k_size, source, begin, end, acc);
  add_split_sums<R, kSplit>(acc, sums);
}

// `block(std::integral_constant<int, R>, std::integral_constant<int, kSplit>, m)` over rows
// [0, rows) of one panel: a call of one or two rows in all (`alone`) splits their features
// in two (memory-bound: the weight streams, nothing else waits); any other call runs the
// fewest blocks of at most kMaxRows rows, as even as they come (32 rows: 6, 6, 5, 5, 5, 5 —
// not five 6s and a 2, whose 4 sums leave the multiply-adds waiting on each other), one
// chain per column, so a row's sums do not depend on which rows share its call.
template <int kMaxRows, class Block>
inline void panel_row_blocks(int64_t rows, bool alone, Block&& block) {
  static_assert(kMaxRows >= 1 && kMaxRows <= 6, "blocks of 1 to 6 rows");
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (alone && rows == 1) return block(One{}, Two{}, int64_t{0});
  if (alone && rows == 2) return block(Two{}, Two{}, int64_t{0});
  const int64_t blocks = (rows + kMaxRows - 1) / kMaxRows;
  int64_t m = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t size = rows / blocks + (b < rows % blocks ? 1 : 0);
    TORCH_INTERNAL_ASSERT(size >= 1 && size <= kMaxRows, "a block of ", size, " rows");
    auto run = [&](auto r) {
      if constexpr (decltype(r)::value <= kMaxRows) block(r, One{}, m);
    };
    switch (size) {
      case 1: run(One{}); break;
      case 2: run(Two{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 5: run(std::integral_constant<int, 5>{}); break;
      case 6: run(std::integral_constant<int, 6>{}); break;
    }
    m += size;
  }
}

// `chunk_against_panel(first, rows, panel)` for every chunk of kChunkRows rows and every
// panel: threads split the panels, each reading a contiguous run of the packed weight while
// a chunk of x stays in cache.
template <class ChunkAgainstPanel>
inline void for_panel_chunks(int64_t num_panels, int64_t num_rows,
                             ChunkAgainstPanel&& chunk_against_panel) {
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = 0; first < num_rows; first += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, num_rows - first);
      for (int64_t panel = begin; panel < end; ++panel) chunk_against_panel(first, rows, panel);
    }
  });
}

// The 16 columns' sums of one row, plus `bias` (or not), to `out`.
inline void store_panel_row(const __m256 (&sums)[2], const float* bias, float* out) {
  const __m256 bias_low = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 bias_high = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  _mm256_storeu_ps(out, _mm256_add_ps(sums[0], bias_low));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(sums[1], bias_high));
}

// Every row of a chunk through one bf16 panel, the bias added to the sums.
inline void panel_rows(const float* x, int64_t rows, int64_t k_size, const uint16_t* panel,
                       const float* bias, float* out, int64_t n_size, bool alone) {
  panel_row_blocks<Bf16Panel::kBlockRows>(rows, alone, [&](auto size, auto split, int64_t m) {
    constexpr int R = decltype(size)::value;
    __m256 sums[R][2];
    panel_sums<R, decltype(split)::value>(x + m * k_size, k_size, Bf16Panel{panel}, 0, k_size,
                                          sums);
    for (int r = 0; r < R; ++r) store_panel_row(sums[r], bias, out + (m + r) * n_size);
  });
}
#endif  // QUIVER_AVX2_FMA

}  // namespace panel_detail

inline at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(panel_applies(x, packed, bias), "panel_linear: needs float32 x [..., K] and bias "
              "[N] matching the packed weight");
#if defined(QUIVER_PANELS)
  const int64_t k_size = packed.size(1), n_size = packed.size(0) * kPanelColumns;
  const Rows<float> x_rows = float_rows(x, k_size);
  at::Tensor out = linear_output(x, n_size);
  if (x_rows.rows == 0) return out;
  const at::Tensor b = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* b_data = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto* w_data = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  float* o_data = out.data_ptr<float>();
  panel_detail::for_panel_chunks(packed.size(0), x_rows.rows,
                                 [&](int64_t first, int64_t rows, int64_t p) {
    panel_detail::panel_rows(x_rows.data + first * k_size, rows, k_size,
                             w_data + p * k_size * kPanelColumns,
                             b_data ? b_data + p * kPanelColumns : nullptr,
                             o_data + first * n_size + p * kPanelColumns, n_size,
                             x_rows.rows <= 2);
  });
  return out;
#else
  TORCH_CHECK(false, "panel_linear is built for CPUs with AVX2 and FMA but not AVX-512");
#endif
}

}  // namespace quiver
