// The kernel of quiver::paged_attention (paged_attention.cpp states the op): every query
// row, decode or prefill, attends to its request's cached keys and values up to its own
// position, read in place block by block.
//
// Each (query row, KV head) serves the query heads that share that KV head (GQA), in tiles of
// up to kMaxTile heads, in float32 (a thread's task is one such pair or a whole row's KV
// heads, see decode_attention):
//   1. scores: kLanes positions at a time (16 with AVX-512, 8 with AVX2); each position's
//      dot products stay kLanes-lane vectors until shuffle-and-add levels fold them into one
//      vector of kLanes scores (one horizontal sum per position would cost more than its
//      dot product);
//   2. softmax numerators over the scores, kLanes at a time;
//   3. values: each position's value row, weighted by its probability, added into the
//      tile's accumulators; one division by the softmax sum at the end.
// With at most kLanes / (head_dim / kLanes) heads per tile the accumulators and queries stay
// in the vector registers. Steps 1 and 3 go span by span (kSpan positions) where a task has
// several tiles: every tile of every KV head takes a span before the next, so the cache is
// read from memory once a task and each tile reads the span from L1.

#include "paged_attention.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace quiver {
namespace {

// A vector of kLanes floats: 16 in an AVX-512 register, else 8 (an AVX2 register: GCC keeps a
// 64-byte vector wider than the target's registers in memory, moved 8 bytes at a time, which
// made this kernel 5x slower on an AVX2-only host).
#if defined(__AVX512F__)
#define QUIVER_LANES 16
#else
#define QUIVER_LANES 8
#endif
constexpr int64_t kLanes = QUIVER_LANES;
typedef float fvec __attribute__((vector_size(4 * QUIVER_LANES)));
typedef int32_t ivec __attribute__((vector_size(4 * QUIVER_LANES)));
typedef uint32_t uvec __attribute__((vector_size(4 * QUIVER_LANES)));
typedef uint16_t hvec __attribute__((vector_size(2 * QUIVER_LANES)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
constexpr int64_t kMaxHeadDim = 128;  // head_dim is a multiple of 16 up to this
constexpr int64_t kMaxGroup = 16;     // query heads per KV head (serving/kernels checks both)

inline fvec load_lanes(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline fvec load_lanes(const c10::BFloat16* p) {  // bf16 is the top half of a float32
#if defined(__AVX512F__)  // one widening load (GCC splits the generic form in two)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(p))), 16));
#else
  hvec half;
  std::memcpy(&half, p, sizeof(half));
  const uvec bits = __builtin_convertvector(half, uvec) << 16;
  fvec v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}
inline fvec load_lanes(const c10::Half* p) {
#if defined(__AVX512F__)  // one conversion (per-lane c10 casts also cost 3x the build time)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  fvec v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}
inline void store_lanes(float* p, fvec v) { std::memcpy(p, &v, sizeof(v)); }
inline void store_lanes(c10::BFloat16* p, fvec v) {  // rounded to nearest even, as c10's
  uvec bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uvec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const hvec half = __builtin_convertvector(v != v ? uvec{} + 0x7FC0u : rounded, hvec);
  std::memcpy(p, &half, sizeof(half));
}
inline void store_lanes(c10::Half* p, fvec v) {  // rounded to nearest even, as c10's
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int64_t i = 0; i < kLanes; ++i) p[i] = static_cast<c10::Half>(v[i]);
#endif
}
inline fvec broadcast(float x) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(x);
#else
  return fvec{} + x;
#endif
}

inline float hsum(fvec v) {
#if QUIVER_LANES == 16
  const f32x8 v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const f32x8 v8 = v;
#endif
  const f32x4 v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) +
                   __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

// The levels that fold kLanes vectors d0, d1, ... into one vector of their lane sums. Each
// level adds the two halves of every source's run of lanes and packs two inputs into one:
// with 16 lanes, fold8(d0, d1) holds d0's sums in lanes 0-7, d1's in 8-15; fold4 of two of
// those holds four sources in runs of 4 lanes; fold2, eight in pairs; fold1, sixteen in
// single lanes. With 8 lanes the same from fold4 down.
#if QUIVER_LANES == 16
inline fvec fold8(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
inline fvec fold4(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                 31);
}
inline fvec fold2(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                 31);
}
inline fvec fold1(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
inline fvec fold4(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline fvec fold2(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
}
inline fvec fold1(fvec a, fvec b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif

// exp(x) for x <= 0 to ~1e-7 relative: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
// polynomial, 2^n through the exponent bits. Below -87 it returns 2^-126 (not 0): still
// nothing next to the row's maximum, whose exp is 1.
inline fvec exp_lanes(fvec x) {
  const fvec lowest = broadcast(-87.0f);
  x = x < lowest ? lowest : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const fvec shifted = x * 1.44269504f + round_magic;
  const fvec n = shifted - round_magic;
  const fvec r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  fvec p = broadcast(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  ivec exponent;
  std::memcpy(&exponent, &shifted, sizeof(exponent));
  ivec magic_bits;
  const fvec magic = broadcast(round_magic);
  std::memcpy(&magic_bits, &magic, sizeof(magic_bits));
  const ivec scale_bits = (exponent - magic_bits + 127) << 23;
  fvec scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

// exp(x - max) in place over [0, n), zero up to padded_len; returns the sum.
float softmax_numerators(float* x, int64_t n, int64_t padded_len) {
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  // the maximum kLanes at a time, not as one scalar chain of compares (~3 % of a long
  // prefill chunk's attention); max is exact, so the lanes' order does not matter
  fvec lanes = broadcast(kMinusInf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const fvec x_lanes = load_lanes(x + i);
    lanes = lanes < x_lanes ? x_lanes : lanes;
  }
  float max_value = kMinusInf;
  for (int64_t lane = 0; lane < kLanes; ++lane) max_value = std::max(max_value, lanes[lane]);
  for (; i < n; ++i) max_value = std::max(max_value, x[i]);
  for (int64_t j = n; j < padded_len; ++j) x[j] = kMinusInf;
  fvec sum = {};
  for (i = 0; i < padded_len; i += kLanes) {
    const fvec scores = load_lanes(x + i);
    const fvec e = scores == kMinusInf ? fvec{} : exp_lanes(scores - max_value);
    store_lanes(x + i, e);
    sum += e;
  }
  return hsum(sum);
}

// One request's cached rows of one KV head in one cache half, in position order.
template <typename scalar_t>
struct CachedRows {
  const scalar_t* cache;  // the half's [num_slots, KV, D], offset to this KV head
  const int64_t* table;
  int64_t seq_len, block_size, row_size;
  int block_shift = -1;  // log2(block_size) where it is a power of two, else -1 (divide)

  // A position's block and place in it: a shift and a mask for the usual power-of-two block
  // size (a 64-bit division costs up to ~45 cycles, as much as a block of 8 positions' dot
  // products on AVX2).
  int64_t block_of(int64_t pos) const {
    return block_shift >= 0 ? pos >> block_shift : pos / block_size;
  }
  int64_t place_in_block(int64_t pos) const {
    return block_shift >= 0 ? pos & (block_size - 1) : pos % block_size;
  }

  // The rows of positions [start, start + block_count(start)), `row_size` apart.
  const scalar_t* block_rows(int64_t start) const {
    return cache + table[block_of(start)] * block_size * row_size;
  }
  int64_t block_count(int64_t start) const { return std::min(block_size, seq_len - start); }

  // Fills rows[0..kLanes) with the rows of positions [first, first + kLanes); past the end, a row
  // of zeros (its scores are masked out by the softmax).
  void gather(int64_t first, const scalar_t** rows) const {
    alignas(64) static const scalar_t zeros[kMaxHeadDim] = {};
    int64_t i = 0;
    for (int64_t pos = first; pos < std::min(first + kLanes, seq_len);) {
      const int64_t place = place_in_block(pos);
      const scalar_t* row = block_rows(pos) + place * row_size;
      const int64_t end = std::min(pos - place + block_size, first + kLanes);
      for (; pos < std::min(end, seq_len); ++pos, row += row_size) rows[i++] = row;
    }
    for (; i < kLanes; ++i) rows[i] = zeros;
  }
};

// log2(n) for a power of two n, else -1.
inline int power_of_two_shift(int64_t n) {
  return n > 0 && (n & (n - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(n)) : -1;
}

// Dot products of a tile's `kTile` query heads (`kChunks` * kLanes dims each, side by side
// from `q_heads`) with one key row, as kLanes-lane vectors of partial sums, in float32 on any
// CPU.
template <typename scalar_t, int64_t kChunks, int64_t kTile>
struct FloatDots {
  using Key = std::array<fvec, kChunks>;
  fvec q[kTile][kChunks];

  explicit FloatDots(const scalar_t* q_heads) {
    for (int64_t g = 0; g < kTile; ++g) {
      for (int64_t c = 0; c < kChunks; ++c) {
        q[g][c] = load_lanes(q_heads + (g * kChunks + c) * kLanes);
      }
    }
  }
  static Key load(const scalar_t* row) {
    Key key;
    for (int64_t c = 0; c < kChunks; ++c) key[c] = load_lanes(row + c * kLanes);
    return key;
  }
  fvec dot(int64_t g, const Key& key) const {
    fvec sum = q[g][0] * key[0];
    for (int64_t c = 1; c < kChunks; ++c) sum += q[g][c] * key[c];
    return sum;
  }
};

#if defined(__AVX512BF16__)
// The same for bf16 heads of a multiple of 32 dims with AVX512-BF16's dot-product
// instruction: 32 bf16 pairs per instruction, the products exact, the sums in float32.
template <int64_t kChunks, int64_t kTile>
struct Bf16Dots {
  static constexpr int64_t kPairs = kChunks / 2;
  using Key = std::array<__m512bh, kPairs>;
  __m512bh q[kTile][kPairs];

  explicit Bf16Dots(const c10::BFloat16* q_heads) {
    for (int64_t g = 0; g < kTile; ++g) {
      for (int64_t c = 0; c < kPairs; ++c) {
        q[g][c] = load32(q_heads + (g * kPairs + c) * 2 * kLanes);
      }
    }
  }
  static __m512bh load32(const c10::BFloat16* p) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  }
  static Key load(const c10::BFloat16* row) {
    Key key;
    for (int64_t c = 0; c < kPairs; ++c) key[c] = load32(row + c * 2 * kLanes);
    return key;
  }
  fvec dot(int64_t g, const Key& key) const {
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[g][0], key[0]);
    for (int64_t c = 1; c < kPairs; ++c) sum = _mm512_dpbf16_ps(sum, q[g][c], key[c]);
    return sum;
  }
};

template <typename scalar_t, int64_t kChunks, int64_t kTile>
using Dots = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16> && kChunks % 2 == 0,
                                Bf16Dots<kChunks, kTile>, FloatDots<scalar_t, kChunks, kTile>>;
#else
template <typename scalar_t, int64_t kChunks, int64_t kTile>
using Dots = FloatDots<scalar_t, kChunks, kTile>;
#endif

// The heads of one tile: `kTile` query heads of `kChunks` * kLanes dims sharing one KV head.
template <typename scalar_t, int64_t kChunks, int64_t kTile>
struct Tile {
  Dots<scalar_t, kChunks, kTile> dots;

  explicit Tile(const scalar_t* q_heads) : dots(q_heads) {}

  // scores[g][first + i] for the kLanes rows: each row's dot vectors folded level by level.
  void scores_block(const scalar_t* const* rows, float scale, float* scores,
                    int64_t padded_len) const {
#if QUIVER_LANES == 16
    fvec halves[kTile][2];  // rows 0-7 and 8-15
#pragma GCC unroll 2
    for (int64_t h = 0; h < 2; ++h) {
      fvec quads[kTile][2];
#pragma GCC unroll 2
      for (int64_t q = 0; q < 2; ++q) {
        fvec pairs[kTile][2];
#pragma GCC unroll 2
        for (int64_t p = 0; p < 2; ++p) {
          const auto first = dots.load(rows[h * 8 + q * 4 + p * 2]);
          const auto second = dots.load(rows[h * 8 + q * 4 + p * 2 + 1]);
#pragma GCC unroll 4
          for (int64_t g = 0; g < kTile; ++g) {
            pairs[g][p] = fold8(dots.dot(g, first), dots.dot(g, second));
          }
        }
#pragma GCC unroll 4
        for (int64_t g = 0; g < kTile; ++g) quads[g][q] = fold4(pairs[g][0], pairs[g][1]);
      }
#pragma GCC unroll 4
      for (int64_t g = 0; g < kTile; ++g) halves[g][h] = fold2(quads[g][0], quads[g][1]);
    }
#pragma GCC unroll 4
    for (int64_t g = 0; g < kTile; ++g) {
      store_lanes(scores + g * padded_len, fold1(halves[g][0], halves[g][1]) * scale);
    }
#else
    fvec quads[kTile][2];  // rows 0-3 and 4-7
#pragma GCC unroll 2
    for (int64_t q = 0; q < 2; ++q) {
      fvec pairs[kTile][2];
#pragma GCC unroll 2
      for (int64_t p = 0; p < 2; ++p) {
        const auto first = dots.load(rows[q * 4 + p * 2]);
        const auto second = dots.load(rows[q * 4 + p * 2 + 1]);
#pragma GCC unroll 4
        for (int64_t g = 0; g < kTile; ++g) {
          pairs[g][p] = fold4(dots.dot(g, first), dots.dot(g, second));
        }
      }
#pragma GCC unroll 4
      for (int64_t g = 0; g < kTile; ++g) quads[g][q] = fold2(pairs[g][0], pairs[g][1]);
    }
#pragma GCC unroll 4
    for (int64_t g = 0; g < kTile; ++g) {
      store_lanes(scores + g * padded_len, fold1(quads[g][0], quads[g][1]) * scale);
    }
#endif
  }

  // Scores of positions [begin, end) into into[g * padded_len + pos]; begin is a multiple of
  // kLanes, and so is end unless it is the request's last position.
  void scores(const CachedRows<scalar_t>& keys, int64_t begin, int64_t end, float scale,
              float* into, int64_t padded_len) const {
    const scalar_t* rows[kLanes];
    for (int64_t first = begin; first < end; first += kLanes) {
      keys.gather(first, rows);
      scores_block(rows, scale, into + first, padded_len);
    }
  }

  // acc[g] += probs[g][pos] * value row over positions [begin, end), in position order: the
  // tile's kHeadDim-float accumulators wait in memory between spans, so the sums are the
  // same whatever the spans.
  void add_values(const CachedRows<scalar_t>& rows, int64_t begin, int64_t end,
                  const float* probs, int64_t padded_len, float* acc_rows) const {
    fvec acc[kTile][kChunks];
    for (int64_t g = 0; g < kTile; ++g) {
      for (int64_t c = 0; c < kChunks; ++c) {
        acc[g][c] = load_lanes(acc_rows + (g * kChunks + c) * kLanes);
      }
    }
    for (int64_t pos = begin; pos < end;) {
      const int64_t place = rows.place_in_block(pos);
      const scalar_t* row = rows.block_rows(pos) + place * rows.row_size;
      const int64_t stop = std::min(end, pos - place + rows.block_size);
      for (; pos < stop; ++pos, row += rows.row_size) {
        fvec value[kChunks];
#pragma GCC unroll 8
        for (int64_t c = 0; c < kChunks; ++c) value[c] = load_lanes(row + c * kLanes);
#pragma GCC unroll 4
        for (int64_t g = 0; g < kTile; ++g) {
          const fvec p = broadcast(probs[g * padded_len + pos]);
#pragma GCC unroll 8
          for (int64_t c = 0; c < kChunks; ++c) acc[g][c] += p * value[c];
        }
      }
    }
    for (int64_t g = 0; g < kTile; ++g) {
      for (int64_t c = 0; c < kChunks; ++c) {
        store_lanes(acc_rows + (g * kChunks + c) * kLanes, acc[g][c]);
      }
    }
  }
};

// The largest tile whose queries and accumulators fit the registers: 4 heads of 64 dims in
// AVX-512's 32, one in AVX2's 16.
template <int64_t kChunks>
constexpr int64_t kMaxTile = std::max<int64_t>(1, std::min<int64_t>(4, kLanes / kChunks));

// Positions a pass covers before the next head or tile takes them: over this many positions
// one KV head's keys (or values) fill 16 KB, which stay in L1 while every tile of its group
// reads them, and a position's KV heads, side by side in the cache, come in from memory once
// for all the task's heads. Without spans AVX2 (one 64-dim head a tile: its queries and
// accumulators fill the 16 registers) read SmolLM2's keys and values three times a KV head,
// from memory where a row's context outgrew L2.
template <typename scalar_t, int64_t kChunks>
constexpr int64_t kSpan = std::max<int64_t>(
    kLanes, 16384 / (kChunks * kLanes * static_cast<int64_t>(sizeof(scalar_t))) / kLanes * kLanes);

// Query row `query` over KV heads [first_kv_head, first_kv_head + kv_heads) and the query
// heads sharing them: every tile's scores span by span, the softmaxes, then every tile's
// weighted values span by span, each head divided by its softmax sum at the end.
template <typename scalar_t, int64_t kChunks>
void decode_task(const DecodeArgs<scalar_t>& args, const CachedQuery& query,
                 int64_t first_kv_head, int64_t kv_heads, std::vector<float>& scratch) {
  constexpr int64_t kHeadDim = kChunks * kLanes;
  const int64_t group = args.num_heads / args.num_kv_heads;
  const int64_t heads = kv_heads * group, first_head = first_kv_head * group;
  const int64_t seq_len = query.seq_len, block_size = args.block_size;
  const int64_t row_size = args.num_kv_heads * kHeadDim;
  const scalar_t* k_cache = args.kv_cache;
  const scalar_t* v_cache = k_cache + args.num_slots * row_size;
  const float scale = static_cast<float>(args.scale);
  const int block_shift = power_of_two_shift(block_size);
  const int64_t padded_len = (seq_len + kLanes - 1) / kLanes * kLanes;
  // one tile over one KV head needs no spans: its accumulators stay in registers throughout
  const bool one_pass = kv_heads == 1 && group <= kMaxTile<kChunks>;
  const int64_t span = one_pass ? padded_len : kSpan<scalar_t, kChunks>;
  scratch.resize(heads * (padded_len + kHeadDim + 1));
  float* const scores = scratch.data();
  float* const acc = scores + heads * padded_len;
  float* const sums = acc + heads * kHeadDim;
  std::fill(acc, acc + heads * kHeadDim, 0.0f);
  const scalar_t* const q_heads = args.query.row(query.row) + first_head * kHeadDim;

  // f(tile, rows of its KV head, its first head among the task's) for every tile, span by span
  auto each_tile = [&](const scalar_t* cache, auto&& f) {
    for (int64_t begin = 0; begin < seq_len; begin += span) {
      const int64_t end = std::min(seq_len, begin + span);
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        const CachedRows<scalar_t> rows{cache + (first_kv_head + kv) * kHeadDim, query.table,
                                        seq_len, block_size, row_size, block_shift};
        for (int64_t done = 0; done < group;) {
          const int64_t tile = std::min(group - done, kMaxTile<kChunks>);
          const int64_t head = kv * group + done;
          const scalar_t* const q = q_heads + head * kHeadDim;
          switch (tile) {
            case 1: f(Tile<scalar_t, kChunks, 1>(q), rows, begin, end, head); break;
            case 2: f(Tile<scalar_t, kChunks, 2>(q), rows, begin, end, head); break;
            case 3: f(Tile<scalar_t, kChunks, 3>(q), rows, begin, end, head); break;
            default: f(Tile<scalar_t, kChunks, kMaxTile<kChunks>>(q), rows, begin, end, head);
          }
          done += tile;
        }
      }
    }
  };
  each_tile(k_cache, [&](const auto& tile, const CachedRows<scalar_t>& keys, int64_t begin,
                         int64_t end, int64_t head) {
    tile.scores(keys, begin, end, scale, scores + head * padded_len, padded_len);
  });
  for (int64_t h = 0; h < heads; ++h) {
    sums[h] = softmax_numerators(scores + h * padded_len, seq_len, padded_len);
  }
  each_tile(v_cache, [&](const auto& tile, const CachedRows<scalar_t>& values, int64_t begin,
                         int64_t end, int64_t head) {
    tile.add_values(values, begin, end, scores + head * padded_len, padded_len,
                    acc + head * kHeadDim);
  });
  for (int64_t h = 0; h < heads; ++h) {
    const float inverse = 1.0f / sums[h];
    scalar_t* const out_row = args.out.row(query.row) + (first_head + h) * kHeadDim;
    for (int64_t c = 0; c < kChunks; ++c) {
      store_lanes(out_row + c * kLanes, load_lanes(acc + h * kHeadDim + c * kLanes) * inverse);
    }
  }
}

template <typename scalar_t, int64_t kChunks>
void decode_attention(const DecodeArgs<scalar_t>& args, const CachedQuery* queries,
                      int64_t count) {
  const int64_t num_kv_heads = args.num_kv_heads;
  // Threads take the next task as they finish one: a chunk's rows differ in length (its
  // context + 1 up to context + its length), so an even split of the list would leave one
  // thread the long ones. Tasks go from the end of the list, a chunk's longest rows first,
  // so the last tasks taken are short. A task is a row's KV heads, span by span, where
  // the rows can keep every thread busy, else one (row, KV head): a position's heads share
  // cache lines and pages, and split between threads each core also pulled in lines of heads
  // it did not read. float32 decodes over 190 positions, the cache streaming from memory
  // (AVX2, 2 cores), a layer: 32 rows 0.84 -> 0.67-0.71 ms, 8 rows 0.23 -> 0.19, 2 rows
  // 0.039 -> 0.030; one row as one task ran on one core, 0.021 -> 0.026. So fewer rows than
  // threads still split by KV head, and so do rows of which one is longer than a thread's
  // share of all positions (a long context among short ones would hold one core).
  const int64_t threads = at::get_num_threads();
  int64_t positions = 0, longest = 0;
  for (int64_t i = 0; i < count; ++i) {
    positions += queries[i].seq_len;
    longest = std::max(longest, queries[i].seq_len);
  }
  // (fewer rows than threads fail this too: their positions are under threads * longest)
  const int64_t heads_per_task = longest * threads <= positions ? num_kv_heads : 1;
  const int64_t num_tasks = count * num_kv_heads / heads_per_task;
  std::atomic<int64_t> taken{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    for (int64_t n = taken.fetch_add(1); n < num_tasks; n = taken.fetch_add(1)) {
      const int64_t first = (num_tasks - 1 - n) * heads_per_task;  // of the (row, head) pairs
      decode_task<scalar_t, kChunks>(args, queries[first / num_kv_heads], first % num_kv_heads,
                                     heads_per_task, scratch);
    }
  });
}

}  // namespace

template <typename scalar_t>
void attend_cached(const DecodeArgs<scalar_t>& args, const CachedQuery* queries, int64_t count) {
  const int64_t group = args.num_heads / args.num_kv_heads;
  TORCH_CHECK(group <= kMaxGroup, "at most ", kMaxGroup, " query heads per KV head");
  switch (args.head_dim) {
    case 16: return decode_attention<scalar_t, 16 / kLanes>(args, queries, count);
    case 32: return decode_attention<scalar_t, 32 / kLanes>(args, queries, count);
    case 48: return decode_attention<scalar_t, 48 / kLanes>(args, queries, count);
    case 64: return decode_attention<scalar_t, 64 / kLanes>(args, queries, count);
    case 80: return decode_attention<scalar_t, 80 / kLanes>(args, queries, count);
    case 96: return decode_attention<scalar_t, 96 / kLanes>(args, queries, count);
    case 112: return decode_attention<scalar_t, 112 / kLanes>(args, queries, count);
    case 128: return decode_attention<scalar_t, 128 / kLanes>(args, queries, count);
    default: TORCH_CHECK(false, "head_dim ", args.head_dim, " has no decode kernel");
  }
}

// build.py compiles this file once per dtype (QUIVER_DECODE_DTYPE 0, 1, 2) so the three
// build side by side; everything above has internal linkage, so the objects link together.
#if !defined(QUIVER_DECODE_DTYPE) || QUIVER_DECODE_DTYPE == 0
template void attend_cached<float>(const DecodeArgs<float>&, const CachedQuery*, int64_t);
#endif
#if !defined(QUIVER_DECODE_DTYPE) || QUIVER_DECODE_DTYPE == 1
template void attend_cached<c10::BFloat16>(const DecodeArgs<c10::BFloat16>&, const CachedQuery*,
                                           int64_t);
#endif
#if !defined(QUIVER_DECODE_DTYPE) || QUIVER_DECODE_DTYPE == 2
template void attend_cached<c10::Half>(const DecodeArgs<c10::Half>&, const CachedQuery*, int64_t);
#endif

}  // namespace quiver
