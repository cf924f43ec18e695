// Host-side launch helpers of the conv_bn_relu CUDA kernels (conv_bn_relu_kernels.cuh), shared
// by conv_bn_relu_cuda.cu and bn_relu_pool_cuda.cu: the layout view of a tensor, the vector
// width, and the launch shapes of the element-wise and per-channel reduction drivers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "conv_bn_relu_kernels.cuh"

namespace med3d_ext {

// CUDA training statistics of y (mean, invstd, unbiased var) in one pass (conv_bn_relu_cuda.cu),
// and whether MED3D_EXT_GENERIC_STATS=1 asks for bn_stats + ATen instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_stats_cuda(const at::Tensor& y,
                                                                     double eps);
bool generic_stats();

namespace cbr {

struct Geometry {
  bool cl;
  int64_t N, C, S, M;  // M = N * S rows (channels_last_3d view)
};

inline Geometry geometry(const at::Tensor& y) {
  // The kernels index every tensor as a dense (N*C, S) or (M, C) matrix in y's memory order.
  M3D_CHECK(y.is_contiguous() || is_channels_last_3d(y),
              "med3d_ext.conv_bn_relu3d (CUDA): internal error: y must be contiguous or "
              "channels_last_3d, got strides ", y.strides());
  const int64_t N = y.size(0), C = y.size(1);
  const int64_t S = (N * C != 0) ? y.numel() / (N * C) : 0;
  return {is_channels_last_3d(y), N, C, S, N * S};
}

// 128-bit vectors for fp32/fp16/bf16 (float64 is a test dtype and stays scalar).
template <typename scalar_t>
constexpr int vec_width() {
  return sizeof(scalar_t) >= 8 ? 1 : 16 / int(sizeof(scalar_t));
}

template <typename scalar_t>
inline bool can_vectorise(const Geometry& g, std::initializer_list<const void*> ptrs) {
  constexpr int V = vec_width<scalar_t>();
  if ((g.cl ? g.C : g.S) % V != 0) return false;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// The 2-D block of the channels_last kernels: x threads over channel vectors, y over rows.
inline dim3 nhwc_block(int64_t cv) {
  const int tx = int(std::min<int64_t>(std::max<int64_t>(cv, 1), 32));
  return dim3(tx, std::max(1, 256 / tx));
}

// Blocks along the rows of a channels_last pass whose threads keep kRowsInFlight rows' loads in
// flight (Fetches): fewer, longer row splits than one row at a time wants. Each thread gets
// about 8 rows, two rounds of loads (more once the cap of 4 blocks of 256 threads per SM
// applies: 4 rows x 16 bytes in flight per thread is enough there), so its per-channel
// parameters (loaded once per thread) and, in a reduction, the block's tree and partials stay
// small next to the loads; but at least one block per SM while every thread still gets
// >= kRowsInFlight rows. (16 rows a thread, four rounds, left the 64-channel layers of a
// ResNet-50 step below the cap with 2 blocks per SM: ncu on an H100, 8 x 64 x 16 x 32 x 32 bf16,
// 23% achieved occupancy and a third of the DRAM bandwidth for the statistics pass, 15 us;
// the stem's 4x larger pass, at the cap, reached 50% and 71%. Not yet re-measured.)
inline int64_t fetching_row_splits(int64_t M, const dim3& block, int64_t gx) {
  const int64_t by_work = ceil_div(M, int64_t(block.y) * 2 * kRowsInFlight);
  const int64_t fill = std::min(ceil_div(int64_t(sm_count()), gx),
                                ceil_div(M, int64_t(block.y) * kRowsInFlight));
  const int64_t most = ceil_div(4 * int64_t(sm_count()), gx);
  return std::max<int64_t>(1, std::min<int64_t>({std::max(by_work, fill), most, 65535}));
}

template <typename acc_t, int V, class Op>
void launch_elementwise(const Geometry& g, const Op& op, const ParamPtrs<acc_t>& pp,
                        cudaStream_t stream) {
  const int64_t blocks_wanted = 16 * int64_t(sm_count());
  if (!g.cl) {
    const int64_t planes = g.N * g.C, sv = g.S / V, threads = 256;
    const int64_t gy = std::min<int64_t>(planes, 65535);
    const int64_t gx = std::min(ceil_div(sv, threads), std::max<int64_t>(1, ceil_div(blocks_wanted, gy)));
    elementwise_nchw<acc_t, V><<<dim3(gx, gy), threads, 0, stream>>>(op, pp, g.C, g.S, planes);
  } else {
    const dim3 block = nhwc_block(g.C / V);
    const int64_t gx = ceil_div(g.C / V, block.x);
    const int64_t gy = Fetches<Op>::value
                           ? fetching_row_splits(g.M, block, gx)
                           : std::min<int64_t>({ceil_div(g.M, block.y),
                                                std::max<int64_t>(1, ceil_div(blocks_wanted, gx)), 65535});
    elementwise_nhwc<acc_t, V><<<dim3(gx, gy), block, 0, stream>>>(op, pp, g.M, g.C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-channel pair of sums of Acc over the whole tensor, as (C, splits, 2) partials (merged in
// a fixed order by a finishing kernel); returns splits.
template <typename acc_t, int V, class Acc>
int64_t launch_reduce(const Geometry& g, const Acc& acc, const ParamPtrs<acc_t>& pp,
                      at::Tensor& partial, cudaStream_t stream) {
  const int64_t blocks_wanted = 8 * int64_t(sm_count());
  int64_t splits;
  if (!g.cl) {
    splits = std::max<int64_t>(1, std::min(ceil_div(blocks_wanted, g.C), ceil_div(g.M / V, 1024)));
    splits = std::min<int64_t>(splits, 65535);
    partial = at::empty({splits * g.C * 2}, partial.options());
    // gridDim.y <= 65535: blocks loop over the channels beyond it
    const dim3 grid(splits, std::min<int64_t>(g.C, 65535));
    reduce_nchw<acc_t, V><<<grid, 256, 0, stream>>>(acc, pp, g.N, g.C, g.S,
                                                     partial.data_ptr<acc_t>());
  } else {
    const dim3 block = nhwc_block(g.C / V);
    const int64_t gx = ceil_div(g.C / V, block.x);
    splits = Fetches<Acc>::value
                 ? fetching_row_splits(g.M, block, gx)
                 : std::min<int64_t>({ceil_div(g.M, block.y),
                                      std::max<int64_t>(1, ceil_div(blocks_wanted, gx)), 65535});
    partial = at::empty({splits * g.C * 2}, partial.options());
    const size_t smem = size_t(block.x) * block.y * V * 2 * sizeof(acc_t);
    reduce_nhwc<acc_t, V><<<dim3(gx, splits), block, smem, stream>>>(acc, pp, g.M, g.C,
                                                                      partial.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits;
}

}  // namespace cbr
}  // namespace med3d_ext
