// quiver::int8_linear and quiver::int4_linear: bf16 (or float32) rows times a low-bit weight
// packed once, at load, in tiles of 16 output columns, for any number of rows. int8 first:
//
//   int8_linear(x [..., K] bf16, packed [N/16, K/2, 32] int8, scale [N] f32, bias? [N] bf16)
//     -> [..., N] bf16 = (x @ q^T) * scale + bias   (float32 x: float32 bias and output)
//
// torch's own int8 weight kernel multiplies one row at a time: at 32 rows it took 2-2.8x
// oneDNN's bf16 time on SmolLM2's shapes (benchmarks/linear_kernels.py), and rebuilding the
// bf16 weight per call cost more still. Here the weight is packed
// once, at load, as tiles of 16 output columns: for each pair of input features, the tile's
// 32 int8 values (column j: feature k, then k + 1) sit together, so one load and a few
// widening instructions turn them into the bf16 pairs an AVX512-BF16 dot-product instruction
// takes (integers up to 127 are exact in bf16); each row of x multiplies them with its own
// pair of features broadcast to every lane, so a tile's 16 column sums for up to 16 rows
// stay in registers, with no horizontal sums. Up to 16 rows each weight tile is read from
// memory once per call. Past 16 rows (a large decode step, prefill) two neighbouring tiles
// are widened into tile_linear.h's bf16 block of 32 columns, once per chunk of 256 rows,
// and multiplied by its kernel (8 rows by two registers of sums): at 32 and 512 rows that
// took 0.8-0.9x the time of widening one tile for blocks of 16 rows. The scale and the bias
// apply once, to the float32 sums, which are rounded to bf16 once. bf16 rows need
// AVX512-BF16; float32 rows (a model served in float32) take lowbit_float.h's kernels, which
// need AVX2 and FMA. Where the CPU lacks them the op refuses and the projection keeps torch's
// kernel (serving/models/quant.py probes it per dtype).

#pragma once

#include "linear_io.h"
#include "lowbit_float.h"
#include "tile_linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
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
namespace lowbit_detail {

constexpr int64_t kTile = 16;            // output columns a tile: one register's float lanes
constexpr int64_t kWidePair = 2 * kTile;  // bf16 values of one feature pair, once widened
// Past this many rows int8 and int4 widen two tiles at a time into tile_linear.h's blocks
// (below it, reading the low-bit tile as it goes costs fewer bytes than widening it first).
constexpr int64_t kNarrowRows = 16;

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// 16 lanes of two small integers (`even`: feature k, `odd`: feature k + 1) -> 16 bf16 pairs,
// exactly (at most 8 significant bits each): through float32, keeping the top 16 bits.
inline __m512bh bf16_pairs(__m512i even, __m512i odd) {
  const __m512i even_bits =
      _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(even)), 16);
  const __m512i odd_bits = _mm512_castps_si512(_mm512_cvtepi32_ps(odd));
  // (odd_bits & 0xFFFF0000) | even_bits
  return reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(
      odd_bits, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), even_bits, 0xEA));
}

// How a packed tile holds one feature pair of its 16 columns, and how it becomes bf16 pairs.
struct Int8Pairs {  // 32 int8: column j's feature k at byte 2j, feature k + 1 at 2j + 1
  static constexpr int64_t kBytes = 2 * kTile;
  static __m512bh widen(const uint8_t* bytes) {
    const __m512i halves =
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    return bf16_pairs(_mm512_srai_epi32(_mm512_slli_epi32(halves, 16), 16),
                      _mm512_srai_epi32(halves, 16));
  }
};
struct Int4Pairs {  // 16 bytes: column j's feature k in byte j's low nibble, k + 1 in its high
  static constexpr int64_t kBytes = kTile;
  static __m512bh widen(const uint8_t* bytes) {
    const __m512i lanes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    return bf16_pairs(_mm512_and_si512(lanes, _mm512_set1_epi32(0xF)),
                      _mm512_srli_epi32(lanes, 4));
  }
};

// Independent sums a row keeps per tile: enough that no chain of dependent dot products sets
// the pace while rows are few (at one row, one set ran int8 at 0.6x oneDNN's time, four
// sets at 0.3-0.5x), few enough that many rows stay in registers.
template <int M>
constexpr int kAccumulatorSets = M <= 2 ? 4 : (M <= 4 ? 2 : 1);

// The tile's bf16 pairs for feature pair p: widened from the packing now, or read back from
// a buffer that `widen_tile` filled for every row block (`kWidened`).
template <class Pairs, bool kWidened>
inline __m512bh tile_pairs(const void* tile, int64_t p) {
  if constexpr (kWidened) {
    return reinterpret_cast<__m512bh>(
        _mm512_loadu_si512(static_cast<const uint16_t*>(tile) + p * kWidePair));
  } else {
    return Pairs::widen(static_cast<const uint8_t*>(tile) + p * Pairs::kBytes);
  }
}

// A whole tile of `pairs` feature pairs widened into `widened` (the thread's own).
template <class Pairs>
inline const uint16_t* widen_tile(const uint8_t* tile, int64_t pairs,
                                  std::vector<uint16_t>& widened) {
  widened.resize(pairs * kWidePair);
  for (int64_t p = 0; p < pairs; ++p) {
    _mm512_storeu_si512(widened.data() + p * kWidePair,
                        reinterpret_cast<__m512i>(Pairs::widen(tile + p * Pairs::kBytes)));
  }
  return widened.data();
}

// Two neighbouring tiles (columns 32b to 32b + 32) widened into tile_linear.h's block
// layout `[K/2, 64]`, so its 8-row blocks, two registers of sums each, run over them.
template <class Pairs>
inline const uint16_t* widen_block(const uint8_t* first_tile, int64_t pairs,
                                   std::vector<uint16_t>& widened) {
  widened.resize(pairs * 2 * kWidePair);
  const uint8_t* second_tile = first_tile + pairs * Pairs::kBytes;
  for (int64_t p = 0; p < pairs; ++p) {
    uint16_t* out = widened.data() + p * 2 * kWidePair;
    _mm512_storeu_si512(out, reinterpret_cast<__m512i>(
                                 Pairs::widen(first_tile + p * Pairs::kBytes)));
    _mm512_storeu_si512(out + kWidePair, reinterpret_cast<__m512i>(
                                             Pairs::widen(second_tile + p * Pairs::kBytes)));
  }
  return widened.data();
}

// Past kNarrowRows rows: `rows_against_block(first_row, rows, column, block)` for every chunk
// of rows and every pair of tiles, widened into one `[K/2, 64]` block (threads split the
// pairs). Returns the first tile not covered: an odd last tile of 16 columns, for the
// caller's per-tile path.
template <class Pairs, class RowsAgainstBlock>
inline int64_t widened_blocks(const uint8_t* tiles, int64_t num_tiles, int64_t pairs,
                              int64_t num_rows, RowsAgainstBlock&& rows_against_block) {
  const int64_t blocks = num_tiles / 2;
  for (int64_t first = 0; first < num_rows; first += tile_detail::kChunkRows) {
    const int64_t rows = std::min(tile_detail::kChunkRows, num_rows - first);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint16_t> widened;
      for (int64_t b = begin; b < end; ++b) {
        rows_against_block(first, rows, b * kTileColumns,
                           widen_block<Pairs>(tiles + 2 * b * pairs * Pairs::kBytes, pairs,
                                              widened));
      }
    });
  }
  return 2 * blocks;
}

// Every row of x against one tile, the tile widened once first when more than one block of
// `kLargest` rows will read it: `rows_against(tile_or_widened, std::bool_constant<...>)`.
template <class Pairs, int kLargest, class RowsAgainst>
inline void against_tile(const uint8_t* tile, int64_t rows, int64_t pairs,
                         std::vector<uint16_t>& widened, RowsAgainst&& rows_against) {
  if (rows <= kLargest) {
    rows_against(static_cast<const void*>(tile), std::false_type{});
  } else {
    rows_against(static_cast<const void*>(widen_tile<Pairs>(tile, pairs, widened)),
                 std::true_type{});
  }
}

// int8: out[m][0..16) = x[m] . tile columns, scaled, biased, for M rows of x.
template <int M, bool kWidened>
inline void int8_tile_rows(const uint16_t* x, int64_t k_size, const void* tile,
                           const float* scale, const float* bias, c10::BFloat16* out,
                           int64_t out_stride) {
  constexpr int kSets = kAccumulatorSets<M>;
  __m512 acc[kSets][M];
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
  const int64_t pairs = k_size / 2;
  int64_t p = 0;
  for (; p + kSets <= pairs; p += kSets) {
#pragma GCC unroll 4
    for (int s = 0; s < kSets; ++s) {
      const __m512bh w = tile_pairs<Int8Pairs, kWidened>(tile, p + s);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        acc[s][m] = _mm512_dpbf16_ps(acc[s][m], broadcast_pair(x + m * k_size + 2 * (p + s)), w);
      }
    }
  }
  for (; p < pairs; ++p) {
    const __m512bh w = tile_pairs<Int8Pairs, kWidened>(tile, p);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      acc[0][m] = _mm512_dpbf16_ps(acc[0][m], broadcast_pair(x + m * k_size + 2 * p), w);
    }
  }
  const __m512 scales = _mm512_loadu_ps(scale);
  const __m512 biases = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[0][m];
#pragma GCC unroll 4
    for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_fmadd_ps(sum, scales, biases));
    std::memcpy(out + m * out_stride, &rounded, sizeof(rounded));  // nearest even
  }
}
#endif  // __AVX512BF16__ && __AVX512BW__

}  // namespace lowbit_detail

inline at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  using namespace lowbit_detail;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 &&
                  packed.size(2) == 2 * kTile && packed.is_contiguous(),
              "int8_linear: packed must be a contiguous int8 [N/16, K/2, 32]");
  const int64_t n_size = packed.size(0) * kTile, k_size = 2 * packed.size(1);
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  x.dim() >= 1 && x.size(-1) == k_size,
              "int8_linear: x must be bf16 or float32 [..., ", k_size, "]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n_size &&
                  scale.is_contiguous(),
              "int8_linear: scale must be a contiguous float32 [", n_size, "]");
  TORCH_CHECK(!bias || !bias->defined() ||
                  (bias->scalar_type() == x.scalar_type() && bias->numel() == n_size),
              "int8_linear: bias must be [", n_size, "] in x's dtype");
  if (x.scalar_type() == at::kFloat) {
#if defined(QUIVER_AVX2_FMA)
    return int8_linear_float(x, packed, scale, bias);
#else
    TORCH_CHECK(false, "int8_linear needs a CPU with AVX2 and FMA for float32 rows");
#endif
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const Bf16Rows x_rows = bf16_rows(x, k_size);
  const std::vector<float> bias_f32 = bias_floats(bias, n_size);
  at::Tensor out = linear_output(x, n_size);
  if (x_rows.rows == 0) return out;
  const uint8_t* w_data = reinterpret_cast<const uint8_t*>(packed.data_ptr<int8_t>());
  const float* s_data = scale.data_ptr<float>();
  const float* b_data = bias_f32.empty() ? nullptr : bias_f32.data();
  c10::BFloat16* o_data = out.data_ptr<c10::BFloat16>();
  const int64_t pairs = k_size / 2;
  int64_t first_tile = 0;
  if (x_rows.rows > kNarrowRows) {  // multiplied as bf16 weights are
    first_tile = widened_blocks<Int8Pairs>(
        w_data, packed.size(0), pairs, x_rows.rows,
        [&](int64_t first, int64_t rows, int64_t column, const uint16_t* block) {
          tile_detail::chunk_rows(x_rows.data + first * k_size, rows, k_size, block,
                                  s_data + column, b_data ? b_data + column : nullptr,
                                  o_data + first * n_size + column, n_size);
        });
  }
  // Tiles split between threads, each a contiguous run of the packed weight.
  at::parallel_for(first_tile, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> widened;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t column = tile * kTile;
      const float* tile_bias = b_data ? b_data + column : nullptr;
      against_tile<Int8Pairs, 16>(
          w_data + tile * pairs * Int8Pairs::kBytes, x_rows.rows, pairs, widened,
          [&](const void* source, auto widened_now) {
            for_row_blocks<16>(x_rows.rows, [&](auto block, int64_t m) {
              int8_tile_rows<decltype(block)::value, decltype(widened_now)::value>(
                  x_rows.data + m * k_size, k_size, source, s_data + column, tile_bias,
                  o_data + m * n_size + column, n_size);
            });
          });
    }
  });
  return out;
#else
  TORCH_CHECK(false, "int8_linear needs a CPU with AVX512-BF16 for bf16 rows");
  return at::Tensor();
#endif
}

// ---- int4 (W4A16, grouped, with zero points) -------------------------------------------
//
//   int4_linear(x [..., K] bf16, packed [N/16, K/2, 16] uint8, group_size,
//               scale [K/group, N] f32, offset [K/group, N] f32) -> [..., N] bf16
//   (float32 x: float32 output)
//
// w[n, k] = u[n, k] * scale[g, n] + offset[g, n] with u in [0, 15] (torch's int4 convention
// w = (u - 8) * s + z gives offset = z - 8 s). A tile's byte for feature pair p and column
// j holds u[j, 2p] in its low nibble and u[j, 2p + 1] in its high one; widened to bf16 pairs
// as int8's are. Within a group every row sums x . u with dot products; at the group's end
// y += scale * that + offset * (the row's sum of x over the group), so scales and zero points
// cost two multiply-adds a group and row, not one per weight. torch's int4 kernel took
// 1.6-1.9x oneDNN's bf16 time at 32 rows on SmolLM2's shapes (its cost grows with every row).
// Past 16 rows pairs of tiles are widened into tile_linear.h's blocks, as int8's are.

namespace lowbit_detail {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// out[m][0..16) for M rows against one int4 tile; `group_sums` [M][groups] hold each row's
// sum of x over each group. Blocks of at most 8 rows: the sums and the running outputs
// both stay in registers.
template <int M, bool kWidened>
inline void int4_tile_rows(const uint16_t* x, int64_t k_size, const void* tile,
                           int64_t group_pairs, const float* scale, const float* offset,
                           int64_t n_size, const float* group_sums, c10::BFloat16* out) {
  constexpr int kSets = kAccumulatorSets<M>;
  const int64_t groups = k_size / (2 * group_pairs);
  __m512 y[M];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) y[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kSets][M];
#pragma GCC unroll 4
    for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
    const int64_t first = g * group_pairs, end = first + group_pairs;
    int64_t p = first;
    for (; p + kSets <= end; p += kSets) {
#pragma GCC unroll 4
      for (int s = 0; s < kSets; ++s) {
        const __m512bh w = tile_pairs<Int4Pairs, kWidened>(tile, p + s);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
          acc[s][m] = _mm512_dpbf16_ps(acc[s][m], broadcast_pair(x + m * k_size + 2 * (p + s)),
                                       w);
        }
      }
    }
    for (; p < end; ++p) {
      const __m512bh w = tile_pairs<Int4Pairs, kWidened>(tile, p);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], broadcast_pair(x + m * k_size + 2 * p), w);
      }
    }
    const __m512 scales = _mm512_loadu_ps(scale + g * n_size);
    const __m512 offsets = _mm512_loadu_ps(offset + g * n_size);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
#pragma GCC unroll 4
      for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
      y[m] = _mm512_fmadd_ps(sum, scales, y[m]);
      y[m] = _mm512_fmadd_ps(_mm512_set1_ps(group_sums[m * groups + g]), offsets, y[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    const __m256bh rounded = _mm512_cvtneps_pbh(y[m]);
    std::memcpy(out + m * n_size, &rounded, sizeof(rounded));  // nearest even
  }
}

// The same over a block of 32 columns widened into tile_linear.h's layout (`widen_block`):
// blocks of at most 4 rows, whose running outputs and group sums, two registers a row
// each, stay in registers.
template <int M>
inline void int4_block_rows(const uint16_t* x, int64_t k_size, const uint16_t* block,
                            int64_t group_pairs, const float* scale, const float* offset,
                            int64_t n_size, const float* group_sums, c10::BFloat16* out) {
  const int64_t groups = k_size / (2 * group_pairs);
  __m512 y[M][2];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) y[m][0] = y[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[M][2];
    tile_detail::pair_sums<M>(x, k_size, block, g * group_pairs, (g + 1) * group_pairs, acc);
    const float* scales = scale + g * n_size;
    const float* offsets = offset + g * n_size;
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      const __m512 s = _mm512_loadu_ps(scales + 16 * t), o = _mm512_loadu_ps(offsets + 16 * t);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        y[m][t] = _mm512_fmadd_ps(acc[m][t], s, y[m][t]);
        y[m][t] = _mm512_fmadd_ps(_mm512_set1_ps(group_sums[m * groups + g]), o, y[m][t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      const __m256bh rounded = _mm512_cvtneps_pbh(y[m][t]);
      std::memcpy(out + m * n_size + 16 * t, &rounded, sizeof(rounded));  // nearest even
    }
  }
}

// Each row's sum of x over each group (`rows` x `groups`), 16 float32 lanes at a time.
inline std::vector<float> group_sums(const uint16_t* x, int64_t rows, int64_t k_size,
                                     int64_t group_size) {
  const int64_t groups = k_size / group_size;
  std::vector<float> sums(rows * groups);
  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* values = x + (i / groups) * k_size + (i % groups) * group_size;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < group_size; k += 16) {
        const __mmask16 mask = group_size - k >= 16 ? 0xFFFF : (1u << (group_size - k)) - 1u;
        const __m256i half = _mm256_maskz_loadu_epi16(mask, values + k);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(
                                     _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
      }
      sums[i] = _mm512_reduce_add_ps(sum);
    }
  });
  return sums;
}
#endif  // __AVX512BF16__ && __AVX512BW__

}  // namespace lowbit_detail

inline at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                              const at::Tensor& scale, const at::Tensor& offset) {
  using namespace lowbit_detail;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 &&
                  packed.size(2) == kTile && packed.is_contiguous(),
              "int4_linear: packed must be a contiguous uint8 [N/16, K/2, 16]");
  const int64_t n_size = packed.size(0) * kTile, k_size = 2 * packed.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && k_size % group_size == 0,
              "int4_linear: the group size must be even and divide K = ", k_size);
  const int64_t groups = k_size / group_size;
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  x.dim() >= 1 && x.size(-1) == k_size,
              "int4_linear: x must be bf16 or float32 [..., ", k_size, "]");
  for (const at::Tensor* t : {&scale, &offset}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == groups &&
                    t->size(1) == n_size && t->is_contiguous(),
                "int4_linear: scale and offset must be contiguous float32 [", groups, ", ",
                n_size, "]");
  }
  if (x.scalar_type() == at::kFloat) {
#if defined(QUIVER_AVX2_FMA)
    return int4_linear_float(x, packed, group_size, scale, offset);
#else
    TORCH_CHECK(false, "int4_linear needs a CPU with AVX2 and FMA for float32 rows");
#endif
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const Bf16Rows x_rows = bf16_rows(x, k_size);
  at::Tensor out = linear_output(x, n_size);
  if (x_rows.rows == 0) return out;
  const std::vector<float> sums = group_sums(x_rows.data, x_rows.rows, k_size, group_size);
  const uint8_t* w_data = packed.data_ptr<uint8_t>();
  const float* s_data = scale.data_ptr<float>();
  const float* o_data = offset.data_ptr<float>();
  c10::BFloat16* out_data = out.data_ptr<c10::BFloat16>();
  const int64_t pairs = k_size / 2, group_pairs = group_size / 2;
  int64_t first_tile = 0;
  if (x_rows.rows > kNarrowRows) {
    first_tile = widened_blocks<Int4Pairs>(
        w_data, packed.size(0), pairs, x_rows.rows,
        [&](int64_t first, int64_t rows, int64_t column, const uint16_t* block) {
          for_row_blocks<4>(rows, [&](auto size, int64_t m) {
            const int64_t row = first + m;
            int4_block_rows<decltype(size)::value>(
                x_rows.data + row * k_size, k_size, block, group_pairs, s_data + column,
                o_data + column, n_size, sums.data() + row * groups,
                out_data + row * n_size + column);
          });
        });
  }
  at::parallel_for(first_tile, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> widened;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t column = tile * kTile;
      against_tile<Int4Pairs, 8>(
          w_data + tile * pairs * Int4Pairs::kBytes, x_rows.rows, pairs, widened,
          [&](const void* source, auto widened_now) {
            for_row_blocks<8>(x_rows.rows, [&](auto block, int64_t m) {
              int4_tile_rows<decltype(block)::value, decltype(widened_now)::value>(
                  x_rows.data + m * k_size, k_size, source, group_pairs, s_data + column,
                  o_data + column, n_size, sums.data() + m * groups,
                  out_data + m * n_size + column);
            });
          });
    }
  });
  return out;
#else
  TORCH_CHECK(false, "int4_linear needs a CPU with AVX512-BF16 for bf16 rows");
  return at::Tensor();
#endif
}

}  // namespace quiver
