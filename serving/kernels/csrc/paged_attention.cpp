// Paged attention for the native engine on CPU: one op per layer and step.
//
//   quiver::paged_attention(query [T, H, D], key [T, KV, D], value [T, KV, D],
//                           kv_cache [2, num_slots, KV, D] (mutated), metadata int64 [L],
//                           block_size, scale) -> [T, H * D]
//
// It writes the step's K/V into their cache slots, then attends. The flat batch holds
// decodes first (one query row each), then prefill chunks. Decode rows read their keys and
// values in place, block by block, with no gather: one task per (request, KV head) serves
// the H / KV query heads that share that KV head (GQA), in float32. Prefill chunks go
// through ATen's scaled_dot_product_attention (GEMM-shaped work), over the chunk's own
// K/V when it has no cached context, else over its blocks gathered once.
//
// `metadata` packs every per-step index into one tensor so a compiled graph sees a single
// dynamic size (see serving/models/attention.py, which builds it):
//   [num_tokens, num_seqs, max_blocks, num_decodes,
//    slot_mapping[num_tokens], query_start[num_seqs + 1], seq_lens[num_seqs],
//    block_tables[num_seqs * max_blocks]]

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace quiver {
namespace {

constexpr int64_t kHeaderSize = 4;

struct StepIndex {
  int64_t num_tokens, num_seqs, max_blocks, num_decodes;
  const int64_t* slot_mapping;
  const int64_t* query_start;
  const int64_t* seq_lens;
  const int64_t* block_tables;

  static StepIndex parse(const at::Tensor& metadata) {
    TORCH_CHECK(metadata.scalar_type() == at::kLong && metadata.dim() == 1 &&
                    metadata.is_contiguous(),
                "metadata must be a contiguous int64 vector");
    const int64_t* data = metadata.data_ptr<int64_t>();
    TORCH_CHECK(metadata.numel() >= kHeaderSize, "metadata has no header");
    StepIndex index{data[0], data[1], data[2], data[3], nullptr, nullptr, nullptr, nullptr};
    const int64_t expected = kHeaderSize + index.num_tokens + 2 * index.num_seqs + 1 +
                             index.num_seqs * index.max_blocks;
    TORCH_CHECK(metadata.numel() == expected, "metadata has ", metadata.numel(),
                " entries, its header says ", expected);
    index.slot_mapping = data + kHeaderSize;
    index.query_start = index.slot_mapping + index.num_tokens;
    index.seq_lens = index.query_start + index.num_seqs + 1;
    index.block_tables = index.seq_lens + index.num_seqs;
    return index;
  }
};

// Row `t` of a [T, heads, D] tensor whose heads are contiguous rows of D.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t row_stride;
  scalar_t* row(int64_t t) const { return data + t * row_stride; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              "attention inputs need contiguous heads");
  return {x.data_ptr<scalar_t>(), x.stride(0)};
}

template <typename scalar_t>
void write_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                 const StepIndex& index) {
  const int64_t row_size = key.size(1) * key.size(2);
  const int64_t num_slots = kv_cache.size(1);
  const Rows<scalar_t> keys = rows_of<scalar_t>(key), values = rows_of<scalar_t>(value);
  scalar_t* k_cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* v_cache = k_cache + num_slots * row_size;
  for (int64_t t = 0; t < index.num_tokens; ++t) {
    const int64_t slot = index.slot_mapping[t];
    TORCH_CHECK(slot >= 0 && slot < num_slots, "slot ", slot, " is outside the cache");
    std::memcpy(k_cache + slot * row_size, keys.row(t), row_size * sizeof(scalar_t));
    std::memcpy(v_cache + slot * row_size, values.row(t), row_size * sizeof(scalar_t));
  }
}

// 16 floats in whatever registers the target has (one AVX-512 register, two AVX2 ...).
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;
// A decode task holds at most this many query heads per KV head; head_dim is a multiple
// of 16 up to 128 (serving/kernels/__init__.py checks both before choosing this kernel).
constexpr int64_t kMaxGroup = 16;

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f32x16 load16(const at::BFloat16* p) {  // bf16 is the top half of a float32
  u16x16 half;
  std::memcpy(&half, p, sizeof(half));
  const u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline f32x16 load16(const at::Half* p) {
  f32x16 v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
inline f32x16 broadcast(float x) { return f32x16{} + x; }

inline float hsum(f32x16 v) {
  const f32x8 v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) +
                   __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

// exp(x) for x <= 0 to ~1e-7 relative: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
// polynomial, 2^n through the exponent bits. Below -87 it returns 2^-126 (not 0): still
// nothing next to the row's maximum, whose exp is 1.
inline f32x16 exp16(f32x16 x) {
  const f32x16 lowest = broadcast(-87.0f);
  x = x < lowest ? lowest : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const f32x16 shifted = x * 1.44269504f + round_magic;
  const f32x16 n = shifted - round_magic;
  const f32x16 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  f32x16 p = broadcast(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i32x16 exponent;
  std::memcpy(&exponent, &shifted, sizeof(exponent));
  i32x16 magic_bits;
  const f32x16 magic = broadcast(round_magic);
  std::memcpy(&magic_bits, &magic, sizeof(magic_bits));
  const i32x16 scale_bits = (exponent - magic_bits + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

// One decode task: the `group` query heads of request `seq` that share KV head `kv_head`,
// over the request's cached positions read in place. `kChunks` is head_dim / 16.
template <typename scalar_t, int64_t kChunks>
struct DecodeTask {
  const scalar_t* k_cache;  // [num_slots, KV, D]
  const scalar_t* v_cache;
  int64_t num_kv_heads, group, block_size;
  float scale;

  void run(const StepIndex& index, const Rows<scalar_t>& query, const Rows<scalar_t>& out,
           int64_t seq, int64_t kv_head, std::vector<float>& scores) const {
    const int64_t seq_len = index.seq_lens[seq];
    const int64_t padded_len = (seq_len + kLanes - 1) / kLanes * kLanes;
    scores.resize(group * padded_len);
    f32x16 q[kMaxGroup][kChunks];
    for (int64_t g = 0; g < group; ++g) {
      const scalar_t* row = query.row(seq) + (kv_head * group + g) * kChunks * kLanes;
      for (int64_t c = 0; c < kChunks; ++c) q[g][c] = load16(row + c * kLanes) * scale;
    }
    const int64_t* table = index.block_tables + seq * index.max_blocks;
    compute_scores(table, kv_head, seq_len, padded_len, q, scores.data());
    float sums[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) {
      sums[g] = softmax_numerators(scores.data() + g * padded_len, seq_len, padded_len);
    }
    f32x16 acc[kMaxGroup][kChunks] = {};
    accumulate_values(table, kv_head, seq_len, padded_len, scores.data(), acc);
    for (int64_t g = 0; g < group; ++g) {
      scalar_t* row = out.row(seq) + (kv_head * group + g) * kChunks * kLanes;
      const float inverse = 1.0f / sums[g];
      for (int64_t c = 0; c < kChunks; ++c) {
        const f32x16 value = acc[g][c] * inverse;
        for (int64_t i = 0; i < kLanes; ++i) {
          row[c * kLanes + i] = static_cast<scalar_t>(value[i]);
        }
      }
    }
  }

  // Calls fn(position, cache row of this KV head) for every cached position, block by block.
  template <typename Fn>
  void for_each_position(const int64_t* table, int64_t kv_head, int64_t seq_len,
                         const scalar_t* cache, Fn&& fn) const {
    const int64_t row_size = num_kv_heads * kChunks * kLanes;
    for (int64_t start = 0; start < seq_len; start += block_size) {
      const scalar_t* base = cache + (table[start / block_size] * block_size) * row_size +
                             kv_head * kChunks * kLanes;
      const int64_t count = std::min(block_size, seq_len - start);
      for (int64_t i = 0; i < count; ++i) fn(start + i, base + i * row_size);
    }
  }

  void compute_scores(const int64_t* table, int64_t kv_head, int64_t seq_len,
                      int64_t padded_len, const f32x16 (*q)[kChunks], float* scores) const {
    for_each_position(table, kv_head, seq_len, k_cache, [&](int64_t pos, const scalar_t* k) {
      f32x16 key[kChunks];
      for (int64_t c = 0; c < kChunks; ++c) key[c] = load16(k + c * kLanes);
      for (int64_t g = 0; g < group; ++g) {
        f32x16 dot = q[g][0] * key[0];
        for (int64_t c = 1; c < kChunks; ++c) dot += q[g][c] * key[c];
        scores[g * padded_len + pos] = hsum(dot);
      }
    });
  }

  void accumulate_values(const int64_t* table, int64_t kv_head, int64_t seq_len,
                         int64_t padded_len, const float* probs,
                         f32x16 (*acc)[kChunks]) const {
    for_each_position(table, kv_head, seq_len, v_cache, [&](int64_t pos, const scalar_t* v) {
      f32x16 value[kChunks];
      for (int64_t c = 0; c < kChunks; ++c) value[c] = load16(v + c * kLanes);
      for (int64_t g = 0; g < group; ++g) {
        const f32x16 p = broadcast(probs[g * padded_len + pos]);
        for (int64_t c = 0; c < kChunks; ++c) acc[g][c] += p * value[c];
      }
    });
  }

  // exp(x - max) in place over [0, n), zero up to padded_len; returns the sum.
  static float softmax_numerators(float* x, int64_t n, int64_t padded_len) {
    float max_value = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) max_value = std::max(max_value, x[i]);
    for (int64_t i = n; i < padded_len; ++i) x[i] = -std::numeric_limits<float>::infinity();
    f32x16 sum = {};
    for (int64_t i = 0; i < padded_len; i += kLanes) {
      f32x16 e = exp16(load16(x + i) - max_value);
      e = load16(x + i) == -std::numeric_limits<float>::infinity() ? f32x16{} : e;
      std::memcpy(x + i, &e, sizeof(e));
      sum += e;
    }
    return hsum(sum);
  }
};

template <typename scalar_t, int64_t kChunks>
void decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, at::Tensor& out,
                      const StepIndex& index, int64_t block_size, double scale) {
  const int64_t num_kv_heads = kv_cache.size(2);
  const int64_t num_slots = kv_cache.size(1);
  const scalar_t* k_cache = kv_cache.data_ptr<scalar_t>();
  const DecodeTask<scalar_t, kChunks> task{
      k_cache, k_cache + num_slots * num_kv_heads * kChunks * kLanes, num_kv_heads,
      query.size(1) / num_kv_heads, block_size, static_cast<float>(scale)};
  const Rows<scalar_t> q_rows = rows_of<scalar_t>(query);
  const Rows<scalar_t> out_rows{out.data_ptr<scalar_t>(), out.stride(0)};
  const int64_t num_tasks = index.num_decodes * num_kv_heads;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      task.run(index, q_rows, out_rows, i / num_kv_heads, i % num_kv_heads, scores);
    }
  });
}

template <typename scalar_t>
void decode_rows(const at::Tensor& query, const at::Tensor& kv_cache, at::Tensor& out,
                 const StepIndex& index, int64_t block_size, double scale) {
  const int64_t group = query.size(1) / kv_cache.size(2);
  TORCH_CHECK(group <= kMaxGroup, "at most ", kMaxGroup, " query heads per KV head");
  switch (query.size(2)) {
    case 16: return decode_attention<scalar_t, 1>(query, kv_cache, out, index, block_size, scale);
    case 32: return decode_attention<scalar_t, 2>(query, kv_cache, out, index, block_size, scale);
    case 48: return decode_attention<scalar_t, 3>(query, kv_cache, out, index, block_size, scale);
    case 64: return decode_attention<scalar_t, 4>(query, kv_cache, out, index, block_size, scale);
    case 80: return decode_attention<scalar_t, 5>(query, kv_cache, out, index, block_size, scale);
    case 96: return decode_attention<scalar_t, 6>(query, kv_cache, out, index, block_size, scale);
    case 112: return decode_attention<scalar_t, 7>(query, kv_cache, out, index, block_size, scale);
    case 128: return decode_attention<scalar_t, 8>(query, kv_cache, out, index, block_size, scale);
    default: TORCH_CHECK(false, "head_dim ", query.size(2), " has no decode kernel");
  }
}

// `[n, KV, D]` rows of one cache half gathered by block ids -> `[1, KV, seq_len, D]`.
at::Tensor gather_blocks(const at::Tensor& cache, const int64_t* table, int64_t num_blocks,
                         int64_t block_size, int64_t seq_len) {
  const int64_t num_kv_heads = cache.size(1), head_dim = cache.size(2);
  at::Tensor blocks = cache.view({cache.size(0) / block_size, -1});
  at::Tensor ids = at::from_blob(const_cast<int64_t*>(table), {num_blocks}, at::kLong);
  at::Tensor gathered = blocks.index_select(0, ids).view({-1, num_kv_heads, head_dim});
  return gathered.narrow(0, 0, seq_len).transpose(0, 1).unsqueeze(0);
}

// One prefill chunk: query rows [start, start + query_len), context seq_len after it.
void prefill_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& kv_cache, at::Tensor& out, const StepIndex& index,
                       int64_t seq, int64_t block_size, double scale) {
  const int64_t start = index.query_start[seq];
  const int64_t query_len = index.query_start[seq + 1] - start;
  const int64_t seq_len = index.seq_lens[seq];
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = key.size(1), group = num_heads / num_kv_heads;
  // [T, KV, g, D] -> [1, KV, g * T, D]: the query heads sharing a KV head as extra rows.
  at::Tensor grouped = query.narrow(0, start, query_len)
                           .reshape({query_len, num_kv_heads, group, head_dim})
                           .permute({1, 2, 0, 3})
                           .reshape({1, num_kv_heads, group * query_len, head_dim});
  at::Tensor keys, values, bias;
  if (seq_len == query_len) {
    keys = key.narrow(0, start, query_len).transpose(0, 1).unsqueeze(0);
    values = value.narrow(0, start, query_len).transpose(0, 1).unsqueeze(0);
  } else {
    const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
    const int64_t* table = index.block_tables + seq * index.max_blocks;
    keys = gather_blocks(kv_cache.select(0, 0), table, num_blocks, block_size, seq_len);
    values = gather_blocks(kv_cache.select(0, 1), table, num_blocks, block_size, seq_len);
  }
  // Row i (position seq_len - query_len + i) sees keys up to its own position.
  at::Tensor rows = at::arange(query_len, at::kLong).unsqueeze(1).add(seq_len - query_len);
  at::Tensor is_future = at::arange(seq_len, at::kLong).unsqueeze(0).gt(rows);
  bias = at::zeros({query_len, seq_len}, query.options())
             .masked_fill_(is_future, -std::numeric_limits<double>::infinity())
             .repeat({group, 1});
  at::Tensor output = at::scaled_dot_product_attention(grouped, keys, values, bias, 0.0,
                                                       false, scale);
  // [1, KV, g * T, D] -> [T, KV * g * D]
  out.narrow(0, start, query_len)
      .copy_(output.view({num_kv_heads, group, query_len, head_dim})
                 .permute({2, 0, 1, 3})
                 .reshape({query_len, num_heads * head_dim}));
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, at::Tensor kv_cache,
                           const at::Tensor& metadata, int64_t block_size, double scale) {
  const StepIndex index = StepIndex::parse(metadata);
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "query, key and value must be [T, heads, D]");
  TORCH_CHECK(query.size(0) == index.num_tokens, "query has ", query.size(0),
              " rows, metadata says ", index.num_tokens);
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() &&
                  kv_cache.size(1) % block_size == 0,
              "kv_cache must be a contiguous [2, num_blocks * block_size, KV, D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  key.scalar_type() == kv_cache.scalar_type(),
              "query, key, value and kv_cache must share a dtype");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query heads must be a multiple of KV heads");
  at::Tensor out = at::empty({index.num_tokens, query.size(1) * query.size(2)}, query.options());
  auto write_and_decode = [&](auto zero) {
    using scalar_t = decltype(zero);
    write_cache<scalar_t>(key, value, kv_cache, index);
    if (index.num_decodes > 0) {
      decode_rows<scalar_t>(query, kv_cache, out, index, block_size, scale);
    }
  };
  switch (query.scalar_type()) {
    case at::kFloat: write_and_decode(float{}); break;
    case at::kBFloat16: write_and_decode(at::BFloat16{}); break;
    case at::kHalf: write_and_decode(at::Half{}); break;
    default: TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16");
  }
  for (int64_t seq = index.num_decodes; seq < index.num_seqs; ++seq) {
    prefill_attention(query, key, value, kv_cache, out, index, seq, block_size, scale);
  }
  return out;
}

}  // namespace

// The schema is defined in Python (serving/kernels/ops.py, with its fake implementation);
// this library only adds the CPU kernel.
TORCH_LIBRARY_IMPL(quiver, CPU, m) { m.impl("paged_attention", &paged_attention); }

}  // namespace quiver
