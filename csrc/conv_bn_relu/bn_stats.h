// Per-channel batch statistics for BatchNorm: one pass, Welford, fp32 (or fp64) accumulation.
//
//   bn_stats(x, unbiased) -> (mean, var)
//     x        (N, C, *spatial) floating point; contiguous or channels_last_3d (other strides
//              are made contiguous first)
//     unbiased divide the sum of squares by n - 1 instead of n
//     mean,var (C,) in float32 for fp32/bf16/fp16 input, float64 for float64 input
//
// Statistics run over every dimension except 1. The result depends only on the shape (the
// chunking is a function of it), never on thread timing, so repeated calls are bitwise equal.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../common/checks.h"

namespace med3d_ext {

// Shared entry checks for both devices.
inline void check_bn_stats_input(const at::Tensor& x) {
  M3D_CHECK_ARG(x.defined() && x.dim() >= 2, "bn_stats", "x", x,
                "at least 2-D, (N, C, *spatial)");
  check_float("bn_stats", "x", x);
}

// The accumulation dtype, which is also the output dtype.
inline at::ScalarType bn_stats_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x, bool unbiased);

}  // namespace med3d_ext
