// Linear layers on weights laid out once at load, callable inside a compiled graph.
//
//   quiver::pack_linear_weight(Tensor weight, int batch_size) -> ()
//   quiver::linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor
//   quiver::set_skinny_max_rows(int rows) -> int   (the previous limit; 0..2)
//   quiver::set_linear_tiles(bool enabled) -> bool  (the previous setting)
//   quiver::packed_linear_layout(Tensor weight) -> str  ("tiles", "panels", "onednn" or "none")
//   quiver::row_argmax(Tensor logits) -> Tensor  (row_argmax.h: greedy sampling's reduction,
//     here so it compiles with this file)
//   quiver::int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias) -> Tensor
//   quiver::int4_linear(Tensor x, Tensor packed, int group_size, Tensor scale,
//                       Tensor offset) -> Tensor
//     (lowbit_linear.h: low-bit weights packed at load)
//
// A GEMM runs fastest on a weight laid out for its kernel: Quiver's own for a bf16 weight
// where the CPU has AVX512-BF16 and the shape suits it (tile_linear.h) and for a float32
// weight of bf16 values — a bf16 checkpoint served in float32 — on AVX2 (panel_linear.h: a
// bf16 copy, half the bytes), else oneDNN's blocked layout, which torch keeps in an opaque
// (mkldnn) tensor that torch.compile cannot trace;
// inductor only makes such weights when freezing, and a frozen graph cannot be cached on
// disk. So the graph carries the plain weight, and this op finds the weight's laid-out twin
// in a table filled once at load (`pack_linear_weight`), keyed by the plain weight's memory.
// A weight with no twin (or whose memory has since been freed and reused) takes at::linear:
// always correct, only slower. The table holds each twin until a later `pack_linear_weight`
// finds its plain weight gone. A call over one or two bf16 rows (a small decode step) takes
// skinny_linear.h's kernel instead, on the plain weight. `set_linear_tiles(false)` makes
// later packs oneDNN's wherever Quiver's layouts would have applied (benchmarks/engine_steps.py's
// A/B).

#include "lowbit_linear.h"
#include "panel_linear.h"
#include "row_argmax.h"
#include "skinny_linear.h"
#include "tile_linear.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace quiver {
namespace {

class PackedWeights {
 public:
  void add(const at::Tensor& weight, at::Tensor packed) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.storage.expired() ? entries_.erase(it) : std::next(it);
    }
    entries_.insert_or_assign(weight.data_ptr(), Entry{weak_storage(weight), weight.sizes().vec(),
                                                        weight.strides().vec(), std::move(packed)});
  }

  std::optional<at::Tensor> find(const at::Tensor& weight) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(weight.data_ptr());
    if (it == entries_.end()) return std::nullopt;
    const Entry& entry = it->second;
    auto storage = entry.storage.lock();
    if (!storage || storage.get() != weight.storage().unsafeGetStorageImpl() ||
        weight.sizes() != at::IntArrayRef(entry.sizes) ||
        weight.strides() != at::IntArrayRef(entry.strides)) {
      return std::nullopt;
    }
    return entry.packed;
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    std::vector<int64_t> sizes, strides;
    at::Tensor packed;
  };

  static c10::weak_intrusive_ptr<c10::StorageImpl> weak_storage(const at::Tensor& weight) {
    return weight.storage().getWeakStorageImpl();
  }

  std::mutex mutex_;
  std::unordered_map<const void*, Entry> entries_;
};

PackedWeights& packed_weights() {
  static PackedWeights table;
  return table;
}

std::atomic<bool>& tiles_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// Which kernel a twin is laid out for: oneDNN's is opaque; Quiver's own are bf16, as tiles
// (tile_linear.h) for a bf16 weight, as panels (panel_linear.h) for a float32 one.
enum class Layout { kTiles, kPanels, kOneDnn };

Layout twin_layout(const at::Tensor& weight, const at::Tensor& packed) {
  if (packed.is_mkldnn()) return Layout::kOneDnn;
  return weight.scalar_type() == at::kFloat ? Layout::kPanels : Layout::kTiles;
}

void pack_linear_weight(const at::Tensor& weight, int64_t batch_size) {
  TORCH_CHECK(weight.dim() == 2, "a linear weight is [out_features, in_features]");
  if (tiles_enabled().load() && tile_packable(weight)) {
    packed_weights().add(weight, tile_pack(weight));
    return;
  }
  if (tiles_enabled().load() && panel_packable(weight)) {
    packed_weights().add(weight, panel_pack(weight));
    return;
  }
  static auto reorder = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                            .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
  packed_weights().add(weight, reorder.call(weight.contiguous(), batch_size));
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  if (std::optional<at::Tensor> out = skinny_linear(x, weight, bias)) return *out;
  std::optional<at::Tensor> packed = packed_weights().find(weight);
  if (!packed) return at::linear(x, weight, bias);
  switch (twin_layout(weight, *packed)) {
    case Layout::kTiles:
      if (tile_applies(x, *packed, bias)) return tile_linear(x, *packed, bias);
      return at::linear(x, weight, bias);
    case Layout::kPanels:
      if (panel_applies(x, *packed, bias)) return panel_linear(x, *packed, bias);
      return at::linear(x, weight, bias);
    case Layout::kOneDnn:
      break;
  }
  static auto linear_pointwise =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return linear_pointwise.call(x.contiguous(), *packed, bias, "none",
                               c10::List<std::optional<at::Scalar>>(), "");
}

int64_t set_skinny_max_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0 && rows <= kSkinnyMaxRows, "skinny_linear takes 0 to ", kSkinnyMaxRows,
              " rows, not ", rows);
  return skinny_rows_limit().exchange(rows);
}

bool set_linear_tiles(bool enabled) { return tiles_enabled().exchange(enabled); }

// Which twin `linear` finds for this weight now: the load-time log's and the tests' answer.
std::string packed_linear_layout(const at::Tensor& weight) {
  std::optional<at::Tensor> packed = packed_weights().find(weight);
  if (!packed) return "none";
  switch (twin_layout(weight, *packed)) {
    case Layout::kTiles: return "tiles";
    case Layout::kPanels: return "panels";
    case Layout::kOneDnn: break;
  }
  return "onednn";
}

}  // namespace

// No tensor argument to dispatch on: a composite kernel serves every backend (the schema is
// defined in serving/kernels/ops.py, as every quiver op's is).
TORCH_LIBRARY_IMPL(quiver, CompositeExplicitAutograd, m) {
  m.impl("set_skinny_max_rows", &set_skinny_max_rows);
  m.impl("set_linear_tiles", &set_linear_tiles);
}

TORCH_LIBRARY_IMPL(quiver, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("linear", &linear);
  m.impl("packed_linear_layout", &packed_linear_layout);
  m.impl("row_argmax", &row_argmax);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}

}  // namespace quiver
