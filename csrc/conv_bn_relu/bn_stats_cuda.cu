// CUDA kernels for bn_stats (see bn_stats.h).
//
// Two launches: a partial pass writes one Welford state per (channel, split) and a finishing
// pass merges each channel's splits, a warp per channel, in a fixed order. The launch shape depends only on the
// tensor shape and the GPU's SM count, so results are reproducible run to run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bn_stats.h"
#include "../common/cuda_utils.cuh"

namespace med3d_ext {
namespace {

constexpr int kThreads = 256;

// (N, C, S) contiguous. grid = (splits, min(C, 65535)); block b of channel c walks its share of
// the N*S values, sample by sample so the inner loop is a contiguous, coalesced run over S.
// Blocks loop over channels because gridDim.y is at most 65535 (e.g. a (N, 100000) input).
template <typename scalar_t, typename acc_t>
__global__ void partial_nchw(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t S,
                             WelfordState<acc_t>* __restrict__ partial) {
  __shared__ WelfordState<acc_t> shared[kThreads / 32];
  const int64_t splits = gridDim.x, M = N * S;  // partial is (C, splits)
  const int64_t per = (M + splits - 1) / splits;
  const int64_t lo = blockIdx.x * per, hi = min(M, lo + per);
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // block-uniform
    auto s = welford_empty<acc_t>();
    for (int64_t i = lo; i < hi;) {
      const int64_t n = i / S, s0 = i - n * S, s1 = min(S, s0 + (hi - i));
      const scalar_t* base = x + (n * C + c) * S;
      for (int64_t k = s0 + threadIdx.x; k < s1; k += blockDim.x)
        welford_add(s, static_cast<acc_t>(base[k]));
      i += s1 - s0;
    }
    s = block_welford(s, shared);
    if (threadIdx.x == 0) partial[c * splits + blockIdx.x] = s;
    __syncthreads();  // warp 0 has read `shared` before the next channel overwrites it
  }
}

// Row-major (M, C) (channels_last_3d). block = (32 channels, 8 rows); grid = (C / 32, splits).
// Each thread walks rows with a stride, then the 8 row-threads of a channel merge in order.
template <typename scalar_t, typename acc_t>
__global__ void partial_nhwc(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                             WelfordState<acc_t>* __restrict__ partial) {
  __shared__ WelfordState<acc_t> shared[8][32];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;  // (32-bit, this wrapped at C = 2^32)
  const int64_t stride = int64_t(blockDim.y) * gridDim.y;
  auto s = welford_empty<acc_t>();
  if (c < C) {
    // Four independent rows per step: the loads are issued before the (dependent) Welford
    // updates, so each thread keeps several loads in flight (one 2-4 byte load at a time
    // left the memory system mostly idle).
    int64_t r = blockIdx.y * blockDim.y + threadIdx.y;
    for (; r + 3 * stride < M; r += 4 * stride) {
      acc_t v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = static_cast<acc_t>(x[(r + k * stride) * C + c]);
#pragma unroll
      for (int k = 0; k < 4; ++k) welford_add(s, v[k]);
    }
    for (; r < M; r += stride) welford_add(s, static_cast<acc_t>(x[r * C + c]));
  }
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < 8; ++k) s = welford_merge(s, shared[k][threadIdx.x]);
    partial[c * gridDim.y + blockIdx.y] = s;
  }
}

// A warp per channel (block = 8 warps): lane l merges splits l, l + 32, ... in order, then a
// fixed shuffle tree; the order depends only on `splits`, so results are reproducible.
template <typename acc_t>
__global__ void finish(const WelfordState<acc_t>* __restrict__ partial, int64_t splits, int64_t C,
                       bool unbiased, acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (c >= C) return;  // warp-uniform
  auto s = welford_empty<acc_t>();
  for (int64_t k = threadIdx.x & 31; k < splits; k += 32) s = welford_merge(s, partial[c * splits + k]);
  for (int d = 16; d > 0; d >>= 1) s = welford_merge(s, warp_shfl_down(s, d));
  if ((threadIdx.x & 31) != 0) return;
  mean[c] = s.mean;
  var[c] = welford_variance(s, unbiased);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x_in, bool unbiased) {
  check_bn_stats_input(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = (C == 0 || N == 0) ? 0 : x_in.numel() / (N * C);
  auto opts = x_in.options().dtype(bn_stats_acc_type(x_in));
  auto mean = at::empty({C}, opts), var = at::empty({C}, opts);
  if (C == 0) return {mean, var};
  if (N * S == 0) {
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  const bool cl = is_channels_last_3d(x_in);
  at::Tensor x = cl ? x_in : x_in.contiguous();
  const int64_t M = N * S;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Enough blocks to fill the GPU a few times over, but no block with under ~1k values.
  const int64_t target_blocks = 4 * int64_t(sm_count());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t splits;
    at::Tensor partial;
    if (cl) {
      const int64_t col_blocks = ceil_div(C, 32);
      splits = std::max<int64_t>(1, std::min(ceil_div(target_blocks, col_blocks), ceil_div(M, 1024)));
      splits = std::min<int64_t>(splits, 65535);
      partial = at::empty({splits * C * 3}, opts);
      partial_nhwc<scalar_t, acc_t><<<dim3(col_blocks, splits), dim3(32, 8), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), M, C,
          reinterpret_cast<WelfordState<acc_t>*>(partial.data_ptr<acc_t>()));
    } else {
      splits = std::max<int64_t>(1, std::min(ceil_div(target_blocks, C), ceil_div(M, 4096)));
      partial = at::empty({splits * C * 3}, opts);
      const dim3 grid(splits, std::min<int64_t>(C, 65535));
      partial_nchw<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), N, C, S,
          reinterpret_cast<WelfordState<acc_t>*>(partial.data_ptr<acc_t>()));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish<acc_t><<<ceil_div(C, 8), 256, 0, stream>>>(
        reinterpret_cast<const WelfordState<acc_t>*>(partial.const_data_ptr<acc_t>()), splits, C,
        unbiased, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) { m.impl("bn_stats", &bn_stats_cuda); }

}  // namespace med3d_ext
