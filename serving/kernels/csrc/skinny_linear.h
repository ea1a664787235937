// A linear layer over a few rows (a decode step of one to a few requests), shared by
// packed_linear.cpp's quiver::linear and implemented in skinny_linear.cpp.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace quiver {

// The most rows `skinny_linear` takes: past them oneDNN's blocked GEMM is the faster one.
constexpr int64_t kSkinnyMaxRows = 2;

// `x [..., K] @ weight[N, K]^T + bias` where it applies — bf16 x, weight and bias, a
// contiguous weight, at most kSkinnyMaxRows rows, a CPU with AVX-512 — else nullopt.
std::optional<at::Tensor> skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias);

}  // namespace quiver
