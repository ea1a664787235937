// quiver::int8_linear and quiver::int4_linear (lowbit_linear.h) for float32 rows, on CPUs
// with AVX2 and FMA.
//
// A model served in float32 (`--dtype auto` on a CPU without native bf16) hands these ops
// float32 rows. The same packed tiles serve them: a feature pair's 16 columns widen to
// float32 in registers (int8: sign-extend, split the pair, convert; int4: zero-extend, split
// the nibbles, convert, then dequantize, u * scale + offset of the feature's group in one
// rounding) and go through panel_linear.h's sums, 4 rows x 16 columns at a time in registers,
// one chain per column over all K from three rows up (a call of one or two rows splits
// features in two, and int4 there sums x . u per group, scaling the sums: see
// int4_rows_alone). Past kWidenRows rows in a chunk, its first block (kWideningRows rows)
// also writes what it widens into a float32 panel that the chunk's other rows read in
// blocks of up to 6 (or, where that block would cost the chunk one block more, the tile is
// widened first and every row reads the panel), the same values in the same order, so a
// row's result does not depend on which path its call took. int8's scale and bias apply to
// the float32 sums; int4 has no epilogue (its groups' scales and zero points are in the
// weights), so prefill's many rows run the same panel loop as int8. Before these, float32
// rows went to torch's scalar low-bit kernels or, past one row, rebuilt the float weight per
// call.

#pragma once

#include "linear_io.h"
#include "panel_linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <type_traits>
#include <vector>

namespace quiver {
namespace lowbit_detail {

#if defined(QUIVER_AVX2_FMA)

// A source of weights for panel_linear.h's sums: `load(k, w)` gives features k to
// k + kFeatures - 1 of 16 columns in float32 (w[f][0] columns 0-7, w[f][1] 8-15); a
// grouped one (int4) gives instead `group(g)`, the source of group g's features, its scales
// bound.

struct Int8PairsF32 {  // one int8 tile [K/2, 32]: column j's feature k at byte 2j, k + 1 at 2j + 1
  static constexpr int kFeatures = 2;
  static constexpr int64_t kWidenRows = 5;  // more rows in a chunk: the tile widened to a panel
  static constexpr int kBlockRows = 4;      // its 4 registers of weights leave room for 4 rows
  // rows of the block that widens the tile: 10 chains of sums in 15 registers. Against 4
  // rows (on the bf16 panel it had before): alike at 8-64 rows, and a 5-row chunk reads the
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
  static constexpr bool kGrouped = false;
  void prefetch(int64_t) const {}  // its scales are the tile's 16 columns of one row
};

// An int4 tile [K/2, 16] as it is: column j's feature k in byte j's low nibble, k + 1 in its
// high nibble.
struct Int4Nibbles {
  static constexpr int kFeatures = 2;
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

// One group of an int4 tile, dequantized as it is read: w = u * scale + offset (one fused
// rounding) with the group's scales and offsets for the 16 columns.
struct Int4GroupF32 {
  static constexpr int kFeatures = 2;
  Int4Nibbles nibbles;
  const float* scale;   // the group's, at the tile's first column
  const float* offset;  // likewise
  void load(int64_t k, __m256 (&w)[2][2]) const {
    nibbles.load(k, w);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(scale + 8 * h), o = _mm256_loadu_ps(offset + 8 * h);
      w[0][h] = _mm256_fmadd_ps(w[0][h], s, o);
      w[1][h] = _mm256_fmadd_ps(w[1][h], s, o);
    }
  }
};

struct Int4PairsF32 {  // one int4 tile, group by group
  static constexpr int kFeatures = 2;
  static constexpr int64_t kWidenRows = 8;
  static constexpr int kBlockRows = 4;
  // 3 rows with their dequantizing: 4 ran alike (32 rows at 0.94x the panels' time with
  // either) but need 17 registers
  static constexpr int kWideningRows = 3;
  const uint8_t* data;
  const float* scale;   // [groups, N] at the tile's first column
  const float* offset;  // likewise
  int64_t n_size, group_features;
  static constexpr bool kGrouped = true;
  int64_t group_size() const { return group_features; }
  Int4GroupF32 group(int64_t g) const {
    return {{data}, scale + g * n_size, offset + g * n_size};
  }
  // A tile's scales and offsets sit a row of N floats apart per group (12 KB at N = 3,072),
  // a stride the hardware prefetcher missed: each group's first loads stalled, and 3,072
  // columns at 32 rows took 1.04x the float32 panels' time (0.93-0.94x prefetched; a layer's
  // four projections 0.97-1.01x -> 0.94x, 8 rows 0.88-0.90x -> 0.86-0.87x). The tile loop
  // asks for the next tile's while this one runs.
  void prefetch(int64_t k_size) const {
    for (int64_t g = 0; g < k_size / group_features; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(scale + g * n_size), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(offset + g * n_size), _MM_HINT_T0);
    }
  }
};

// A tile widened to float32, [K, 16] (36 KB at K = 576: read from L2 as the rows pass).
// int4's dequantized weights need it; int8 on the bf16 panel of its integers it had before
// ran 32 to 2,048 rows at 1.02-1.05x the bf16 model's panels, on this one 1.00-1.03x.
struct F32Panel {
  static constexpr int kFeatures = 1;
  static constexpr int kBlockRows = 6;  // 12 registers of sums, 2 of weights, 1 broadcast
  const float* data;
  void load(int64_t k, __m256 (&w)[1][2]) const {
    w[0][0] = _mm256_loadu_ps(data + k * kPanelColumns);
    w[0][1] = _mm256_loadu_ps(data + k * kPanelColumns + 8);
  }
  static constexpr bool kGrouped = false;
};

// The packing, read by a chunk's first block of rows, writing each feature it widens into
// `panel` (the thread's own F32Panel) for the blocks after it. The first block reads every
// feature once, so the panel is whole when it ends; the widening rides along with that
// block's multiply-adds instead of a pass of its own (which cost 3-8 % of a 32-row call).
// Same values, same order: a row's sums do not depend on which of the two its block read.
template <class Source>
struct Widening {  // a source, what it loads also stored to the panel
  static constexpr int kFeatures = Source::kFeatures;
  Source source;
  float* panel;
  void load(int64_t k, __m256 (&w)[kFeatures][2]) const {
    source.load(k, w);
#pragma GCC unroll 2
    for (int f = 0; f < kFeatures; ++f) {
      _mm256_storeu_ps(panel + (k + f) * kPanelColumns, w[f][0]);
      _mm256_storeu_ps(panel + (k + f) * kPanelColumns + 8, w[f][1]);
    }
  }
};

template <class Tile>
struct WideningSource {  // a tile's source, widening as it goes: itself, or group by group
  static constexpr int kFeatures = Tile::kFeatures;
  static constexpr int kBlockRows = Tile::kWideningRows;
  static constexpr bool kGrouped = Tile::kGrouped;
  Tile tile;
  float* panel;
  void load(int64_t k, __m256 (&w)[kFeatures][2]) const { Widening<Tile>{tile, panel}.load(k, w); }
  int64_t group_size() const { return tile.group_size(); }
  auto group(int64_t g) const { return Widening<decltype(tile.group(g))>{tile.group(g), panel}; }
};

// `range(source, begin, end)` for the runs of features `source` reads as it is: all K, or
// each group with its own source.
template <class Source, class Range>
inline void for_each_range(const Source& source, int64_t k_size, Range&& range) {
  if constexpr (Source::kGrouped) {
    const int64_t size = source.group_size();
    for (int64_t begin = 0; begin < k_size; begin += size) {
      range(source.group(begin / size), begin, begin + size);
    }
  } else {
    range(source, 0, k_size);
  }
}

// `x [..., K]` float32 against every tile: threads split the tiles, rows go in chunks of
// about 1 MiB of x (64 to 256 rows: 256 at K = 576, 170 at 1,536), longer than the bf16
// panels' 64 because each chunk widens every tile again, and `rows_against(source, first,
// rows, tile)` runs rows of a chunk against one tile, `source` reading the packing as it
// goes (a chunk of up to kWidenRows rows; `source_of(tile)`) or the tile's F32Panel. A
// longer chunk widens the tile while its first kWideningRows rows read it (WideningSource),
// unless that block would leave the rest one block more than the panel's blocks of 6 need
// for the whole chunk (12 rows: 5, 4, 3 against 6, 6 — 1.2x the time): then the tile is
// widened first and every row reads the panel.
template <class SourceOf, class RowsAgainst>
inline void float_rows_against_tiles(int64_t num_tiles, int64_t k_size, int64_t num_rows,
                                     SourceOf&& source_of, RowsAgainst&& rows_against) {
  using Source = std::decay_t<decltype(source_of(int64_t{0}))>;
  using Wide = WideningSource<Source>;
  static_assert(Source::kWidenRows >= Wide::kBlockRows, "the panel's rows follow a block");
  constexpr int64_t kPanelRows = F32Panel::kBlockRows;
  const auto blocks = [](int64_t rows) { return (rows + kPanelRows - 1) / kPanelRows; };
  const int64_t chunk_rows = std::clamp<int64_t>((int64_t{1} << 20) / (4 * k_size),
                                                 panel_detail::kChunkRows,
                                                 4 * panel_detail::kChunkRows);
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> widened;
    for (int64_t first = 0; first < num_rows; first += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, num_rows - first);
      for (int64_t tile = begin; tile < end; ++tile) {
        const Source source = source_of(tile);
        if (tile + 1 < end) source_of(tile + 1).prefetch(k_size);
        if (rows <= Source::kWidenRows) {
          rows_against(source, first, rows, tile);
          continue;
        }
        widened.resize(k_size * kPanelColumns);
        const Wide widening{source, widened.data()};
        const F32Panel panel{widened.data()};
        if (1 + blocks(rows - Wide::kBlockRows) > blocks(rows)) {
          for_each_range(widening, k_size, [](const auto& range, int64_t from, int64_t to) {
            constexpr int kFeatures = std::decay_t<decltype(range)>::kFeatures;
            for (int64_t k = from; k < to; k += kFeatures) {
              __m256 w[kFeatures][2];
              range.load(k, w);
            }
          });
          rows_against(panel, first, rows, tile);
          continue;
        }
        rows_against(widening, first, Wide::kBlockRows, tile);
        rows_against(panel, first + Wide::kBlockRows, rows - Wide::kBlockRows, tile);
      }
    }
  });
}

// `store(m, sums)` for each block of rows [0, rows) of x against `source`: its sums over all
// K, range after range continuing the same chains (one per column; two in a call of one or
// two rows in all, `alone`).
template <class Source, class Store>
inline void float_row_blocks(const float* x, int64_t k_size, const Source& source, int64_t rows,
                             bool alone, Store&& store) {
  panel_detail::panel_row_blocks<Source::kBlockRows>(rows, alone, [&](auto size, auto split,
                                                                      int64_t m) {
    constexpr int R = decltype(size)::value, S = decltype(split)::value;
    __m256 acc[S][R][2];
    panel_detail::zero_sums<R, S>(acc);
    // the groups' loop written out here: through a callback GCC kept the sums in memory
    if constexpr (Source::kGrouped) {
      const int64_t size = source.group_size();
      for (int64_t begin = 0; begin < k_size; begin += size) {
        panel_detail::panel_accumulate<R, S>(x + m * k_size, k_size, source.group(begin / size),
                                             begin, begin + size, acc);
      }
    } else {
      panel_detail::panel_accumulate<R, S>(x + m * k_size, k_size, source, 0, k_size, acc);
    }
    __m256 sums[R][2];
    panel_detail::add_split_sums<R, S>(acc, sums);
    store(m, sums);
  });
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
  const int8_t* w_data = packed.data_ptr<int8_t>();
  const float* s_data = scale.data_ptr<float>();
  const float* b_data = b.defined() ? b.data_ptr<float>() : nullptr;
  float* o_data = out.data_ptr<float>();
  float_rows_against_tiles(
      packed.size(0), k_size, num_rows,
      [&](int64_t tile) { return Int8PairsF32{w_data + tile * k_size * kPanelColumns}; },
      [&](const auto& source, int64_t first, int64_t count, int64_t tile) {
        const int64_t column = tile * kPanelColumns;
        const float* scales = s_data + column;
        const float* biases = b_data ? b_data + column : nullptr;
        float_row_blocks(x_rows.data + first * k_size, k_size, source, count, num_rows <= 2,
                         [&](int64_t m, const auto& sums) {
#pragma GCC unroll 8
          for (size_t r = 0; r < std::size(sums); ++r) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              _mm256_storeu_ps(o_data + (first + m + r) * n_size + column + 8 * h,
                               _mm256_fmadd_ps(sums[r][h], _mm256_loadu_ps(scales + 8 * h),
                                               biases ? _mm256_loadu_ps(biases + 8 * h)
                                                      : _mm256_setzero_ps()));
            }
          }
        });
      });
  return out;
}

// One or two rows in all (a decode step of one or two requests, memory-bound): dequantizing
// every weight as it streams put one row at 1.2-1.4x the time of summing x . u per group
// and applying the group's scale and zero point to the sums (y += s * sum + o * sum of x),
// which these calls do instead (from three rows up a row's sums are one chain over all K:
// these split features in two, so no call of three or more rows gives them anyway).
inline void int4_rows_alone(const Rows<float>& x_rows, int64_t k_size, int64_t n_size,
                            const uint8_t* w_data, int64_t group_size, const float* s_data,
                            const float* f_data, float* o_data) {
  const int64_t groups = k_size / group_size, num_rows = x_rows.rows;
  std::vector<float> sums_of_x(num_rows * groups);
  for (int64_t i = 0; i < num_rows * groups; ++i) {
    const float* values = x_rows.data + (i / groups) * k_size + (i % groups) * group_size;
    __m256 lanes = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= group_size; k += 8) lanes = _mm256_add_ps(lanes, _mm256_loadu_ps(values + k));
    alignas(32) float parts[8];
    _mm256_store_ps(parts, lanes);
    float total = 0.0f;
    for (float part : parts) total += part;
    for (; k < group_size; ++k) total += values[k];
    sums_of_x[i] = total;
  }
  at::parallel_for(0, n_size / kPanelColumns, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const Int4Nibbles nibbles{w_data + tile * k_size * kPanelColumns / 2};
      const int64_t column = tile * kPanelColumns;
      panel_detail::panel_row_blocks<2>(num_rows, true, [&](auto size, auto split, int64_t) {
        constexpr int R = decltype(size)::value;
        __m256 y[R][2];
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) y[r][0] = y[r][1] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          __m256 sums[R][2];
          panel_detail::panel_sums<R, decltype(split)::value>(
              x_rows.data, k_size, nibbles, g * group_size, (g + 1) * group_size, sums);
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            const __m256 s = _mm256_loadu_ps(s_data + g * n_size + column + 8 * h);
            const __m256 o = _mm256_loadu_ps(f_data + g * n_size + column + 8 * h);
#pragma GCC unroll 2
            for (int r = 0; r < R; ++r) {
              y[r][h] = _mm256_fmadd_ps(sums[r][h], s, y[r][h]);
              y[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(sums_of_x[r * groups + g]), o, y[r][h]);
            }
          }
        }
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          panel_detail::store_panel_row(y[r], nullptr, o_data + r * n_size + column);
        }
      });
    }
  });
}

inline at::Tensor int4_linear_float(const at::Tensor& x, const at::Tensor& packed,
                                    int64_t group_size, const at::Tensor& scale,
                                    const at::Tensor& offset) {
  const int64_t n_size = packed.size(0) * kPanelColumns, k_size = 2 * packed.size(1);
  const Rows<float> x_rows = float_rows(x, k_size);
  at::Tensor out = linear_output(x, n_size);
  const int64_t num_rows = x_rows.rows;
  if (num_rows == 0) return out;
  const uint8_t* w_data = packed.data_ptr<uint8_t>();
  const float* s_data = scale.data_ptr<float>();
  const float* f_data = offset.data_ptr<float>();
  float* o_data = out.data_ptr<float>();
  if (num_rows <= 2) {
    int4_rows_alone(x_rows, k_size, n_size, w_data, group_size, s_data, f_data, o_data);
    return out;
  }
  float_rows_against_tiles(
      packed.size(0), k_size, num_rows,
      [&](int64_t tile) {
        const int64_t column = tile * kPanelColumns;
        return Int4PairsF32{w_data + tile * k_size * kPanelColumns / 2, s_data + column,
                            f_data + column, n_size, group_size};
      },
      [&](const auto& source, int64_t first, int64_t count, int64_t tile) {
        float_row_blocks(x_rows.data + first * k_size, k_size, source, count, false,
                         [&](int64_t m, const auto& sums) {
#pragma GCC unroll 8
          for (size_t r = 0; r < std::size(sums); ++r) {
            panel_detail::store_panel_row(
                sums[r], nullptr, o_data + (first + m + r) * n_size + tile * kPanelColumns);
          }
        });
      });
  return out;
}
#endif  // QUIVER_AVX2_FMA

}  // namespace lowbit_detail

}  // namespace quiver
