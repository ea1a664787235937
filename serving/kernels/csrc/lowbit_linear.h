// quiver::int8_linear and quiver::int4_linear: bf16 rows times a low-bit weight packed once,
// at load, in tiles of 16 output columns, for any number of rows. int8 first:
//
//   int8_linear(x [..., K] bf16, packed [N/16, K/2, 32] int8, scale [N] f32, bias? [N] bf16)
//     -> [..., N] bf16 = (x @ q^T) * scale + bias
//
// torch's own int8 weight kernel multiplies one row at a time: at 32 rows it ran 8x slower
// than oneDNN's bf16 GEMM on the same shapes (SmolLM2's gate/up projection: 1.05 ms against
// 0.13), and rebuilding the bf16 weight per call cost more still. Here the weight is packed
// once, at load, as tiles of 16 output columns: for each pair of input features, the tile's
// 32 int8 values (column j: feature k, then k + 1) sit together, so one load and a few
// widening instructions turn them into the bf16 pairs an AVX512-BF16 dot-product instruction
// takes (integers up to 127 are exact in bf16); each row of x multiplies them with its own
// pair of features broadcast to every lane, so a tile's 16 column sums for up to 16 rows
// stay in registers, with no horizontal sums. Each weight tile is read from memory once per
// call; past 16 rows it is widened once into a buffer every row block reads. The scale and
// the bias apply once, to the float32 sums, which are rounded to bf16 once. Needs
// AVX512-BF16: elsewhere the op refuses and the projection keeps torch's kernel
// (serving/models/quant.py probes it).

#pragma once

#include <ATen/Parallel.h>
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
namespace lowbit_detail {

constexpr int64_t kTile = 16;          // output columns a tile: one register's float lanes
constexpr int64_t kPairBytes = 2 * kTile;  // a tile's int8 values for one pair of features

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// A tile's 32 int8 values for one feature pair -> 16 lanes of (feature k, feature k + 1)
// as bf16: sign-extend to 16 bits, split each lane's halves into float32 and keep their top
// 16 bits (exact: an int8 has at most 8 significant bits).
inline __m512bh widen_pairs(const int8_t* values) {
  const __m512i halves = _mm512_cvtepi8_epi16(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values)));
  const __m512i even = _mm512_srai_epi32(_mm512_slli_epi32(halves, 16), 16);
  const __m512i odd = _mm512_srai_epi32(halves, 16);
  const __m512i even_bits =
      _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(even)), 16);
  const __m512i odd_bits = _mm512_castps_si512(_mm512_cvtepi32_ps(odd));
  // (odd_bits & 0xFFFF0000) | even_bits
  return reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(
      odd_bits, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), even_bits, 0xEA));
}

inline __m512bh broadcast_pair(const uint16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
}

// The tile's bf16 pairs for feature pair p: widened from int8 now, or read back from a
// buffer that one pass widened for every row block after it (`kWidened`).
template <bool kWidened>
inline __m512bh tile_pairs(const void* tile, int64_t p) {
  if constexpr (kWidened) {
    return reinterpret_cast<__m512bh>(
        _mm512_loadu_si512(static_cast<const uint16_t*>(tile) + p * kPairBytes));
  } else {
    return widen_pairs(static_cast<const int8_t*>(tile) + p * kPairBytes);
  }
}

// out[m][0..16) = x[m] . tile columns, scaled, biased, for M rows of x. Two accumulators a
// row while rows are few, so a dependent chain of dot products never sets the pace.
template <int M, bool kWidened>
inline void tile_rows(const uint16_t* x, int64_t k_size, const void* tile, const float* scale,
                      const float* bias, c10::BFloat16* out, int64_t out_stride) {
  constexpr int kSets = M <= 4 ? 2 : 1;
  __m512 acc[kSets][M];
  for (int s = 0; s < kSets; ++s)
    for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
  const int64_t pairs = k_size / 2;
  int64_t p = 0;
  for (; p + kSets <= pairs; p += kSets) {
    for (int s = 0; s < kSets; ++s) {
      const __m512bh w = tile_pairs<kWidened>(tile, p + s);
      for (int m = 0; m < M; ++m) {
        acc[s][m] = _mm512_dpbf16_ps(acc[s][m], broadcast_pair(x + m * k_size + 2 * (p + s)), w);
      }
    }
  }
  for (; p < pairs; ++p) {
    const __m512bh w = tile_pairs<kWidened>(tile, p);
    for (int m = 0; m < M; ++m) {
      acc[0][m] = _mm512_dpbf16_ps(acc[0][m], broadcast_pair(x + m * k_size + 2 * p), w);
    }
  }
  const __m512 scales = _mm512_loadu_ps(scale);
  const __m512 biases = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[0][m];
    for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_fmadd_ps(sum, scales, biases));
    std::memcpy(out + m * out_stride, &rounded, sizeof(rounded));  // nearest even
  }
}

// Rows [m, rows) of x against one tile: blocks of 16 rows, then 8, 4, 2, 1 for the rest.
template <bool kWidened>
inline void tile_row_blocks(const uint16_t* x, int64_t rows, int64_t k_size, const void* tile,
                            const float* scale, const float* bias, c10::BFloat16* out,
                            int64_t n_size) {
  int64_t m = 0;
  for (; m + 16 <= rows; m += 16)
    tile_rows<16, kWidened>(x + m * k_size, k_size, tile, scale, bias, out + m * n_size,
                            n_size);
  for (int block = 8; block >= 1; block /= 2) {
    if (m + block > rows) continue;
    const uint16_t* x_rows = x + m * k_size;
    c10::BFloat16* out_rows = out + m * n_size;
    switch (block) {
      case 8: tile_rows<8, kWidened>(x_rows, k_size, tile, scale, bias, out_rows, n_size); break;
      case 4: tile_rows<4, kWidened>(x_rows, k_size, tile, scale, bias, out_rows, n_size); break;
      case 2: tile_rows<2, kWidened>(x_rows, k_size, tile, scale, bias, out_rows, n_size); break;
      default: tile_rows<1, kWidened>(x_rows, k_size, tile, scale, bias, out_rows, n_size);
    }
    m += block;
  }
}

// Every row of x against one tile. Past one block of rows, the tile is widened to bf16 once
// (`widened`: K * 16 values, the thread's own) and every block reads that instead, so a
// prefill pays the widening once per tile instead of once per 16 rows.
inline void tile_all_rows(const uint16_t* x, int64_t rows, int64_t k_size, const int8_t* tile,
                          const float* scale, const float* bias, c10::BFloat16* out,
                          int64_t n_size, std::vector<uint16_t>& widened) {
  if (rows <= 16) {
    tile_row_blocks<false>(x, rows, k_size, tile, scale, bias, out, n_size);
    return;
  }
  const int64_t pairs = k_size / 2;
  widened.resize(pairs * kPairBytes);
  for (int64_t p = 0; p < pairs; ++p) {
    _mm512_storeu_si512(widened.data() + p * kPairBytes,
                        reinterpret_cast<__m512i>(widen_pairs(tile + p * kPairBytes)));
  }
  tile_row_blocks<true>(x, rows, k_size, widened.data(), scale, bias, out, n_size);
}
#endif  // __AVX512BF16__ && __AVX512BW__

}  // namespace lowbit_detail

inline at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  using namespace lowbit_detail;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 &&
                  packed.size(2) == kPairBytes && packed.is_contiguous(),
              "int8_linear: packed must be a contiguous int8 [N/16, K/2, 32]");
  const int64_t n_size = packed.size(0) * kTile, k_size = 2 * packed.size(1);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.size(-1) == k_size,
              "int8_linear: x must be bf16 [..., ", k_size, "]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n_size &&
                  scale.is_contiguous(),
              "int8_linear: scale must be a contiguous float32 [", n_size, "]");
  TORCH_CHECK(!bias || !bias->defined() ||
                  (bias->scalar_type() == at::kBFloat16 && bias->numel() == n_size),
              "int8_linear: bias must be bf16 [", n_size, "]");
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const at::Tensor x_rows = x.reshape({-1, k_size}).contiguous();
  const int64_t rows = x_rows.size(0);
  std::vector<float> bias_f32;
  if (bias && bias->defined()) {
    const at::Tensor b = bias->contiguous();
    const c10::BFloat16* data = b.data_ptr<c10::BFloat16>();
    bias_f32.assign(data, data + n_size);
  }
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n_size;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (rows == 0) return out;
  const auto* x_data = reinterpret_cast<const uint16_t*>(x_rows.data_ptr<c10::BFloat16>());
  const int8_t* w_data = packed.data_ptr<int8_t>();
  const float* s_data = scale.data_ptr<float>();
  const float* b_data = bias_f32.empty() ? nullptr : bias_f32.data();
  c10::BFloat16* o_data = out.data_ptr<c10::BFloat16>();
  const int64_t tile_bytes = k_size / 2 * kPairBytes;
  // Tiles split between threads, each a contiguous run of the packed weight.
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> widened;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t column = tile * kTile;
      tile_all_rows(x_data, rows, k_size, w_data + tile * tile_bytes, s_data + column,
                    b_data ? b_data + column : nullptr, o_data + column, n_size, widened);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "int8_linear needs a CPU with AVX512-BF16");
  return at::Tensor();
#endif
}

// ---- int4 (W4A16, grouped, with zero points) -------------------------------------------
//
//   int4_linear(x [..., K] bf16, packed [N/16, K/2, 16] uint8, group_size,
//               scale [K/group, N] f32, offset [K/group, N] f32) -> [..., N] bf16
//
// w[n, k] = u[n, k] * scale[g, n] + offset[g, n] with u in [0, 15] (torch's int4 convention
// w = (u - 8) * s + z gives offset = z - 8 s). A tile's byte for feature pair p and column
// j holds u[j, 2p] in its low nibble and u[j, 2p + 1] in its high one; widened to bf16 pairs
// as int8's are. Within a group every row sums x . u with dot products; at the group's end
// y += scale * that + offset * (the row's sum of x over the group), so scales and zero points
// cost two multiply-adds a group and row, not one per weight. torch's int4 kernel runs at
// 0.78x bf16's speed at 32 rows on SmolLM2 (its cost grows with every row).

namespace lowbit_detail {

constexpr int64_t kNibblePairBytes = kTile;  // a tile's bytes for one feature pair

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
inline __m512bh widen_nibble_pairs(const uint8_t* bytes) {
  const __m512i lanes =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i even = _mm512_and_si512(lanes, _mm512_set1_epi32(0xF));
  const __m512i odd = _mm512_srli_epi32(lanes, 4);
  const __m512i even_bits =
      _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(even)), 16);
  const __m512i odd_bits = _mm512_castps_si512(_mm512_cvtepi32_ps(odd));
  return reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(
      odd_bits, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), even_bits, 0xEA));
}

// A tile's bf16 pairs for feature pair p: widened from nibbles now, or read back from the
// buffer one pass widened for every row block after it (`kWidened`).
template <bool kWidened>
inline __m512bh nibble_tile_pairs(const void* tile, int64_t p) {
  if constexpr (kWidened) {
    return reinterpret_cast<__m512bh>(
        _mm512_loadu_si512(static_cast<const uint16_t*>(tile) + p * kPairBytes));
  } else {
    return widen_nibble_pairs(static_cast<const uint8_t*>(tile) + p * kNibblePairBytes);
  }
}

// out[m][0..16) for M rows against one int4 tile; `group_sums` [M][groups] hold each row's
// sum of x over each group.
template <int M, bool kWidened>
inline void int4_tile_rows(const uint16_t* x, int64_t k_size, const void* tile,
                           int64_t group_pairs, const float* scale, const float* offset,
                           int64_t n_size, const float* group_sums, c10::BFloat16* out) {
  constexpr int kSets = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t groups = k_size / (2 * group_pairs);
  __m512 y[M];
  for (int m = 0; m < M; ++m) y[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kSets][M];
    for (int s = 0; s < kSets; ++s)
      for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
    const int64_t first = g * group_pairs, end = first + group_pairs;
    int64_t p = first;
    for (; p + kSets <= end; p += kSets) {
      for (int s = 0; s < kSets; ++s) {
        const __m512bh w = nibble_tile_pairs<kWidened>(tile, p + s);
        for (int m = 0; m < M; ++m) {
          acc[s][m] = _mm512_dpbf16_ps(acc[s][m], broadcast_pair(x + m * k_size + 2 * (p + s)),
                                       w);
        }
      }
    }
    for (; p < end; ++p) {
      const __m512bh w = nibble_tile_pairs<kWidened>(tile, p);
      for (int m = 0; m < M; ++m) {
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], broadcast_pair(x + m * k_size + 2 * p), w);
      }
    }
    const __m512 scales = _mm512_loadu_ps(scale + g * n_size);
    const __m512 offsets = _mm512_loadu_ps(offset + g * n_size);
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
      y[m] = _mm512_fmadd_ps(sum, scales, y[m]);
      y[m] = _mm512_fmadd_ps(_mm512_set1_ps(group_sums[m * groups + g]), offsets, y[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    const __m256bh rounded = _mm512_cvtneps_pbh(y[m]);
    std::memcpy(out + m * n_size, &rounded, sizeof(rounded));  // nearest even
  }
}

// Every row of x against one int4 tile, in blocks of 8, 4, 2 and 1 rows; past one block the
// tile is widened once into `widened` (the thread's own) and every block reads that.
template <bool kWidened>
inline void int4_row_blocks(const uint16_t* x, int64_t rows, int64_t k_size, const void* tile,
                            int64_t group_pairs, const float* scale, const float* offset,
                            int64_t n_size, const float* group_sums, int64_t groups,
                            c10::BFloat16* out) {
  int64_t m = 0;
  auto block = [&](auto rows_in_block) {
    constexpr int kRows = decltype(rows_in_block)::value;
    int4_tile_rows<kRows, kWidened>(x + m * k_size, k_size, tile, group_pairs, scale, offset,
                                    n_size, group_sums + m * groups, out + m * n_size);
    m += kRows;
  };
  while (m + 8 <= rows) block(std::integral_constant<int, 8>{});
  if (m + 4 <= rows) block(std::integral_constant<int, 4>{});
  if (m + 2 <= rows) block(std::integral_constant<int, 2>{});
  if (m < rows) block(std::integral_constant<int, 1>{});
}
#endif  // __AVX512BF16__ && __AVX512BW__

}  // namespace lowbit_detail

inline at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                              const at::Tensor& scale, const at::Tensor& offset) {
  using namespace lowbit_detail;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 &&
                  packed.size(2) == kNibblePairBytes && packed.is_contiguous(),
              "int4_linear: packed must be a contiguous uint8 [N/16, K/2, 16]");
  const int64_t n_size = packed.size(0) * kTile, k_size = 2 * packed.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && k_size % group_size == 0,
              "int4_linear: the group size must be even and divide K = ", k_size);
  const int64_t groups = k_size / group_size;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.size(-1) == k_size,
              "int4_linear: x must be bf16 [..., ", k_size, "]");
  for (const at::Tensor* t : {&scale, &offset}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == groups &&
                    t->size(1) == n_size && t->is_contiguous(),
                "int4_linear: scale and offset must be contiguous float32 [", groups, ", ",
                n_size, "]");
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const at::Tensor x_rows = x.reshape({-1, k_size}).contiguous();
  const int64_t rows = x_rows.size(0);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n_size;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (rows == 0) return out;
  const auto* x_data = reinterpret_cast<const uint16_t*>(x_rows.data_ptr<c10::BFloat16>());
  std::vector<float> group_sums(rows * groups);  // each row's sum of x over each group
  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // 16 lanes of float32 partial sums at a time
      const uint16_t* values = x_data + (i / groups) * k_size + (i % groups) * group_size;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < group_size; k += 16) {
        const __mmask16 mask = group_size - k >= 16 ? 0xFFFF : (1u << (group_size - k)) - 1u;
        const __m256i half = _mm256_maskz_loadu_epi16(mask, values + k);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(
                                     _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
      }
      group_sums[i] = _mm512_reduce_add_ps(sum);
    }
  });
  const uint8_t* w_data = packed.data_ptr<uint8_t>();
  const float* s_data = scale.data_ptr<float>();
  const float* o_data = offset.data_ptr<float>();
  c10::BFloat16* out_data = out.data_ptr<c10::BFloat16>();
  const int64_t tile_bytes = k_size / 2 * kNibblePairBytes, group_pairs = group_size / 2;
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> widened;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t column = tile * kTile;
      const uint8_t* tile_data = w_data + tile * tile_bytes;
      if (rows <= 8) {
        int4_row_blocks<false>(x_data, rows, k_size, tile_data, group_pairs, s_data + column,
                               o_data + column, n_size, group_sums.data(), groups,
                               out_data + column);
        continue;
      }
      widened.resize(k_size / 2 * kPairBytes);
      for (int64_t p = 0; p < k_size / 2; ++p) {
        _mm512_storeu_si512(widened.data() + p * kPairBytes,
                            reinterpret_cast<__m512i>(widen_nibble_pairs(
                                tile_data + p * kNibblePairBytes)));
      }
      int4_row_blocks<true>(x_data, rows, k_size, widened.data(), group_pairs, s_data + column,
                            o_data + column, n_size, group_sums.data(), groups,
                            out_data + column);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "int4_linear needs a CPU with AVX512-BF16");
  return at::Tensor();
#endif
}

}  // namespace quiver
