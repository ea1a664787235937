// What Quiver's own linear kernels (skinny_linear.h, lowbit_linear.h) share around their
// loops: bf16 rows of x in, a float32 bias, bf16 rows out.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace quiver {

// `x [..., K]` as contiguous `[rows, K]` bf16 values (`tensor` keeps them alive).
struct Bf16Rows {
  at::Tensor tensor;
  const uint16_t* data;
  int64_t rows;
};

inline Bf16Rows bf16_rows(const at::Tensor& x, int64_t k_size) {
  at::Tensor rows = x.reshape({-1, k_size}).contiguous();
  const auto* data = reinterpret_cast<const uint16_t*>(rows.data_ptr<c10::BFloat16>());
  return {rows, data, rows.size(0)};
}

// A bf16 `bias` of `n_size` values as float32; empty when there is none.
inline std::vector<float> bias_floats(const std::optional<at::Tensor>& bias, int64_t n_size) {
  std::vector<float> values;
  if (bias && bias->defined()) {
    const at::Tensor b = bias->contiguous();
    const c10::BFloat16* data = b.data_ptr<c10::BFloat16>();
    values.assign(data, data + n_size);
  }
  return values;
}

// The uninitialised `[..., N]` output of a linear layer over `x [..., K]`.
inline at::Tensor linear_output(const at::Tensor& x, int64_t n_size) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n_size;
  return at::empty(sizes, x.options());
}

}  // namespace quiver
