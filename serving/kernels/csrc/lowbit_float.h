// quiver::int8_linear and quiver::int4_linear (lowbit_linear.h) for float32 rows, on CPUs
// with AVX2 and FMA.
//
// A model served in float32 (`--dtype auto` on a CPU without native bf16) hands these ops
// float32 rows. The same packed tiles serve them: a feature pair's 16 columns widen to
// float32 in registers (int8: sign-extend, split the pair, convert; int4: zero-extend, split
// the nibbles, convert; integers that small are exact in float32) and go through
// panel_linear.h's sums, up to 4 rows x 16 columns in registers, one chain per column from
// three rows up (a call of one or two rows splits features in two). Past kWidenRows rows in
// a chunk, its first block (kWideningRows rows) also writes what it widens into a bf16
// panel (panel_linear.h's layout) that the chunk's other rows read in blocks of up to 6 (or,
// where that block would cost the chunk one block more, the tile is widened first and every
// row reads the panel), in the same order, so a row's result does not depend on which path
// its call took.
// The scale and bias (int8) or the groups' scales and zero points (int4) apply to the
// float32 sums as in the bf16 kernels. Before these, float32 rows went to torch's scalar
// low-bit kernels or, past one row, rebuilt the float weight per call.

#pragma once

#include "linear_io.h"
#include "panel_linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace quiver {
namespace lowbit_detail {

#if defined(QUIVER_AVX2_FMA)

struct Int8PairsF32 {  // one int8 tile [K/2, 32]: column j's feature k at byte 2j, k + 1 at 2j + 1
  static constexpr int kFeatures = 2;
  static constexpr int64_t kWidenRows = 5;  // more rows in a chunk: the tile widened to a panel
  static constexpr int kBlockRows = 4;      // its 4 registers of weights leave room for 4 rows
  // rows of the block that widens the tile: 10 chains of sums in 15 registers (GCC spills
  // a value or two). Against 4 rows: alike at 8-64 rows, and a 5-row chunk reads the
  // packing directly (1.0x the panels' time) instead of widening the tile for one more row
  // (1.3x).
  static constexpr int kWideningRows = 5;
  const int8_t* data;
  void load(int64_t k, __m256 (&w)[2][2]) const {
    const int8_t* pair = data + k * kPanelColumns;  // feature pair k / 2: 32 bytes
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // columns 8h to 8h + 7, both features, as 16-bit lanes
      const __m256i halves = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16 * h)));
      w[0][h] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(halves, 16), 16));
      w[1][h] = _mm256_cvtepi32_ps(_mm256_srai_epi32(halves, 16));
    }
  }
};

struct Int4PairsF32 {  // one int4 tile [K/2, 16]: column j's feature k in byte j's low nibble
  static constexpr int kFeatures = 2;
  static constexpr int64_t kWidenRows = 8;
  static constexpr int kBlockRows = 4;
  static constexpr int kWideningRows = 4;  // 5 spilled the groups' running outputs: +6 % at 32
  const uint8_t* data;
  void load(int64_t k, __m256 (&w)[2][2]) const {
    const uint8_t* pair = data + k * (kPanelColumns / 2);  // feature pair k / 2: 16 bytes
    const __m256i nibble = _mm256_set1_epi32(0xF);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i lanes = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair + 8 * h)));
      w[0][h] = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, nibble));
      w[1][h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lanes, 4));
    }
  }
};

// The packing, read by a chunk's first block of rows, writing each feature it widens into
// `panel` (the thread's own bf16 panel, panel_pack's layout [K, 16], 18 KB at K = 576: it
// stays in L1 where a float32 one would not — a float32 panel ran 32 rows at 1.3x this one's
// time) for the blocks after it; integers this small are exact in bf16. Word j holds column
// j's top half in its low 16 bits and column 8 + j's in its high 16 bits, the order
// Bf16Panel widens back. The first block reads every feature once, so the panel is whole
// when it ends; the widening rides along with that block's multiply-adds instead of a pass
// of its own (which cost 3-8 % of a 32-row call). Same values, same order: a row's sums do
// not depend on which of the two its block read.
template <class Source>
struct WideningSource {
  static constexpr int kFeatures = Source::kFeatures;
  static constexpr int kBlockRows = Source::kWideningRows;
  Source source;
  uint16_t* panel;
  void load(int64_t k, __m256 (&w)[kFeatures][2]) const {
    source.load(k, w);
#pragma GCC unroll 2
    for (int f = 0; f < kFeatures; ++f) {
      const __m256i low = _mm256_srli_epi32(_mm256_castps_si256(w[f][0]), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + (k + f) * kPanelColumns),
                          _mm256_blend_epi16(low, _mm256_castps_si256(w[f][1]), 0xAA));
    }
  }
};

// `x [..., K]` float32 against every tile: threads split the tiles, rows go in chunks of
// about 1 MiB of x (64 to 256 rows: 256 at K = 576, 170 at 1,536), longer than the bf16
// panels' 64 because each chunk widens every tile again (at 512 rows, chunks of 64 put int8
// at 1.08-1.09x the panels' time, of 256 at 1.03-1.04x; x then comes from L3 rather than
// L2), and `rows_against(source, first, rows, tile)` runs rows of a chunk against
// one tile, `source` reading the packing as it goes (a chunk of up to kWidenRows rows) or
// its bf16 panel. A longer chunk widens the tile while its first kWideningRows rows read it
// (WideningSource), unless that block would leave the rest one block more than the panel's
// blocks of 6 need for the whole chunk (12 rows: 5, 4, 3 against 6, 6 — 1.2x the time):
// then the tile is widened first and every row reads the panel.
template <class Source, class RowsAgainst>
inline void float_rows_against_tiles(const uint8_t* tiles, int64_t num_tiles,
                                     int64_t tile_bytes, int64_t k_size, int64_t num_rows,
                                     RowsAgainst&& rows_against) {
  using Widening = WideningSource<Source>;
  static_assert(Source::kWidenRows >= Widening::kBlockRows, "the panel's rows follow a block");
  constexpr int64_t kPanelRows = panel_detail::Bf16Panel::kBlockRows;
  const auto blocks = [](int64_t rows) { return (rows + kPanelRows - 1) / kPanelRows; };
  panel_detail::for_panel_chunks(num_tiles, num_rows, [&](int64_t first, int64_t rows,
                                                          int64_t tile,
                                                          std::vector<uint16_t>& widened) {
    const Source source{reinterpret_cast<const decltype(Source::data)>(tiles + tile * tile_bytes)};
    if (rows <= Source::kWidenRows) return rows_against(source, first, rows, tile);
    widened.resize(k_size * kPanelColumns);
    const Widening widening{source, widened.data()};
    const panel_detail::Bf16Panel panel{widened.data()};
    if (1 + blocks(rows - Widening::kBlockRows) > blocks(rows)) {
      for (int64_t k = 0; k < k_size; k += Source::kFeatures) {
        __m256 w[Source::kFeatures][2];
        widening.load(k, w);
      }
      return rows_against(panel, first, rows, tile);
    }
    rows_against(widening, first, Widening::kBlockRows, tile);
    rows_against(panel, first + Widening::kBlockRows, rows - Widening::kBlockRows, tile);
  }, std::clamp<int64_t>((int64_t{1} << 20) / (4 * k_size), panel_detail::kChunkRows,
                         4 * panel_detail::kChunkRows));
}

// Each row's sum of x over each group (`rows` x `groups`), 8 lanes then the lanes in order.
inline std::vector<float> float_group_sums(const float* x, int64_t rows, int64_t k_size,
                                           int64_t group_size) {
  const int64_t groups = k_size / group_size;
  std::vector<float> sums(rows * groups);
  for (int64_t i = 0; i < rows * groups; ++i) {
    const float* values = x + (i / groups) * k_size + (i % groups) * group_size;
    __m256 lanes = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= group_size; k += 8) lanes = _mm256_add_ps(lanes, _mm256_loadu_ps(values + k));
    alignas(32) float parts[8];
    _mm256_store_ps(parts, lanes);
    float total = 0.0f;
    for (float part : parts) total += part;
    for (; k < group_size; ++k) total += values[k];
    sums[i] = total;
  }
  return sums;
}

inline at::Tensor int8_linear_float(const at::Tensor& x, const at::Tensor& packed,
                                    const at::Tensor& scale,
                                    const std::optional<at::Tensor>& bias) {
  const int64_t n_size = packed.size(0) * kPanelColumns, k_size = 2 * packed.size(1);
  const Rows<float> x_rows = float_rows(x, k_size);
  const at::Tensor b = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor out = linear_output(x, n_size);
  const int64_t num_rows = x_rows.rows;
  if (num_rows == 0) return out;
  const float* x_data = x_rows.data;
  const float* s_data = scale.data_ptr<float>();
  const float* b_data = b.defined() ? b.data_ptr<float>() : nullptr;
  float* o_data = out.data_ptr<float>();
  float_rows_against_tiles<Int8PairsF32>(
      reinterpret_cast<const uint8_t*>(packed.data_ptr<int8_t>()), packed.size(0),
      k_size * kPanelColumns, k_size, num_rows,
      [&](const auto& source, int64_t first, int64_t count, int64_t tile) {
        const int64_t column = tile * kPanelColumns;
        const __m256 scales[2] = {_mm256_loadu_ps(s_data + column),
                                  _mm256_loadu_ps(s_data + column + 8)};
        using Source = std::decay_t<decltype(source)>;
        panel_detail::panel_row_blocks<Source::kBlockRows>(count, num_rows <= 2,
                                                           [&](auto size, auto split,
                                                                 int64_t m) {
          constexpr int R = decltype(size)::value;
          __m256 sums[R][2];
          panel_detail::panel_sums<R, decltype(split)::value>(
              x_data + (first + m) * k_size, k_size, source, 0, k_size, sums);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              const __m256 biases = b_data ? _mm256_loadu_ps(b_data + column + 8 * h)
                                           : _mm256_setzero_ps();
              _mm256_storeu_ps(o_data + (first + m + r) * n_size + column + 8 * h,
                               _mm256_fmadd_ps(sums[r][h], scales[h], biases));
            }
          }
        });
      });
  return out;
}

inline at::Tensor int4_linear_float(const at::Tensor& x, const at::Tensor& packed,
                                    int64_t group_size, const at::Tensor& scale,
                                    const at::Tensor& offset) {
  const int64_t n_size = packed.size(0) * kPanelColumns, k_size = 2 * packed.size(1);
  const int64_t groups = k_size / group_size;
  const Rows<float> x_rows = float_rows(x, k_size);
  at::Tensor out = linear_output(x, n_size);
  const int64_t num_rows = x_rows.rows;
  if (num_rows == 0) return out;
  const float* x_data = x_rows.data;
  const std::vector<float> sums_of_x = float_group_sums(x_data, num_rows, k_size, group_size);
  const float* s_data = scale.data_ptr<float>();
  const float* f_data = offset.data_ptr<float>();
  float* o_data = out.data_ptr<float>();
  float_rows_against_tiles<Int4PairsF32>(
      packed.data_ptr<uint8_t>(), packed.size(0), k_size * kPanelColumns / 2, k_size, num_rows,
      [&](const auto& source, int64_t first, int64_t count, int64_t tile) {
        const int64_t column = tile * kPanelColumns;
        using Source = std::decay_t<decltype(source)>;
        panel_detail::panel_row_blocks<Source::kBlockRows>(count, num_rows <= 2,
                                                           [&](auto size, auto split,
                                                                 int64_t m) {
          constexpr int R = decltype(size)::value;
          const int64_t row = first + m;
          __m256 y[R][2];
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) y[r][0] = y[r][1] = _mm256_setzero_ps();
          for (int64_t g = 0; g < groups; ++g) {
            __m256 sums[R][2];
            panel_detail::panel_sums<R, decltype(split)::value>(
                x_data + row * k_size, k_size, source, g * group_size, (g + 1) * group_size,
                sums);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              const __m256 s = _mm256_loadu_ps(s_data + g * n_size + column + 8 * h);
              const __m256 o = _mm256_loadu_ps(f_data + g * n_size + column + 8 * h);
#pragma GCC unroll 8
              for (int r = 0; r < R; ++r) {
                y[r][h] = _mm256_fmadd_ps(sums[r][h], s, y[r][h]);
                y[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(sums_of_x[(row + r) * groups + g]), o,
                                          y[r][h]);
              }
            }
          }
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              _mm256_storeu_ps(o_data + (row + r) * n_size + column + 8 * h, y[r][h]);
            }
          }
        });
      });
  return out;
}
#endif  // QUIVER_AVX2_FMA

}  // namespace lowbit_detail

}  // namespace quiver
