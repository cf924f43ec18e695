// Small CUDA helpers shared by every op family: launch checks, warp reductions, SM count.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "welford.h"

namespace med3d_ext {

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
__device__ __forceinline__ WelfordState<acc_t> warp_shfl_down(const WelfordState<acc_t>& s,
                                                              int delta) {
  return {__shfl_down_sync(0xffffffffu, s.count, delta),
          __shfl_down_sync(0xffffffffu, s.mean, delta),
          __shfl_down_sync(0xffffffffu, s.m2, delta)};
}

// Merge the Welford states of a whole block in a fixed order; lane 0 of warp 0 gets the result.
// `shared` holds one state per warp. blockDim.x must be a multiple of 32.
template <typename acc_t>
__device__ WelfordState<acc_t> block_welford(WelfordState<acc_t> s, WelfordState<acc_t>* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = 16; d > 0; d >>= 1) s = welford_merge(s, warp_shfl_down(s, d));
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  if (warp == 0) {
    s = lane < warps ? shared[lane] : welford_empty<acc_t>();
    for (int d = 16; d > 0; d >>= 1) s = welford_merge(s, warp_shfl_down(s, d));
  }
  return s;
}

}  // namespace med3d_ext
