// implicit_gemm_conv3d: the stem convolution as an implicit GEMM (ConvAlgo::kImplicitGemm).
//
// Why: im2col3d + cuBLAS (im2col.h) writes the (M, Kp) column matrix out and reads it back:
// 721 MB each way in bf16 at the benchmark's stem (8 x 1 x 64 x 128 x 128), ~0.45 ms per
// direction on an H100, while the GEMMs themselves are ~46 GFLOP (~0.1 ms on tensor cores).
// Here a thread block gathers a tile of the columns straight into shared memory (the same
// make_tap / make_row / element math as im2col3d) and multiplies it there on tensor cores
// (WMMA, bf16/fp16 in, fp32 accumulators), so the columns never reach global memory:
//   forward        rows (M, Cout) = columns (M, Kp) x weight^T (Kp, Cout), a block per
//                  128 rows x 64 channels, K in chunks of 32;
//   weight grad    (Cout, Kp) = grad_rows^T (Cout, M) x columns (M, Kp), a block per 64
//                  channels x 64 columns x a share of the row tiles, its fp32 partial sum
//                  written out and the shares summed after (deterministic, no atomics).
// The kernels take bf16/fp16 on devices of compute capability >= 8.0 with Cout a multiple of
// 64 (the stem has 64); anything else runs im2col3d's GEMMs (the CPU op always does), which
// compute the same sums.
//
// Ops (schemas in csrc/registration.cpp):
//   implicit_gemm_conv3d(x, weight, stride, padding, dilation) -> (N*D'*H'*W', Cout) rows of y
//       in (n, d, h, w) order, x's dtype (y's channels_last_3d memory)
//   implicit_gemm_conv3d_weight_grad(grad_rows, x, weight_size, stride, padding, dilation)
//       -> the weight gradient (weight_size, x's dtype) from grad_y's rows in that order
#pragma once

#include <ATen/ATen.h>

#include "im2col.h"

namespace med3d_ext {

constexpr int64_t kGemmCoutTile = 64;  // output channels per block; Cout must be a multiple

// Entry checks shared by both devices (stem_gemm.cpp): fill g (columns rounded up to `align`)
// and return the row count M.
int64_t check_implicit_gemm_conv3d(const at::Tensor& x, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t align, im2col::Geometry& g);
int64_t check_implicit_gemm_weight_grad(const at::Tensor& grad_rows, const at::Tensor& x,
                                        at::IntArrayRef weight_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t align, im2col::Geometry& g);

// The weight gradient by im2col's GEMMs: the CPU op, and CUDA where the kernels do not apply.
at::Tensor implicit_gemm_weight_grad_by_im2col(const at::Tensor& grad_rows, const at::Tensor& x,
                                               at::IntArrayRef weight_size,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation);

}  // namespace med3d_ext
