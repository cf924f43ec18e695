// The stem max-pool backward's gather pass by tiles (bn_relu_pool_cuda.cu's step 1), opt-in:
// MED3D_EXT_POOL_GATHER=tiles, read at every call, until it has run on a GPU.
//
// Why: PoolGatherOp (one thread per 16-byte channel vector of y, the window walk of
// pool_grad_at) took 280 us at the benchmark's stem (8 x 64 x 32 x 64 x 64 bf16, ncu on an
// H200, 2026-11-28_h200-s19) at 21% of the DRAM bandwidth, 80 registers: per vector an index
// decode, six window bounds (divisions), and up to 8 windows' argmax and gradient loads from
// L1/L2. Its traffic floor is y read and g written once, ~270 MB: ~60 us.
//
// Here a block takes a tile of y's positions (kTD x kTH x kTW of one sample, every channel;
// channels_last_3d only) and first copies the pooled windows that contain any of them (their
// grad_out and argmax rows, contiguous along W and C) to shared memory, together with the
// channels' BatchNorm parameters. Each (position, channel vector) then sums its windows'
// gradients from shared memory in pool_grad_at's order (od, oh, ow ascending), masks by the
// ReLU of its y and stores g: the same values as PoolGatherOp, bit for bit.
#pragma once

#include <cstdlib>
#include <cstring>

#include "bn_relu_pool.h"
#include "conv_bn_relu_launch.cuh"

namespace med3d_ext {
namespace pool_tiles {

using namespace cbr;

constexpr int kTD = 2, kTH = 4, kTW = 16;  // positions per tile: 128
constexpr int kThreads = 256;
constexpr int64_t kSmemBudget = 40 * 1024;  // under the 48 KB default

// The first and last window containing position x of an axis (pool_grad_at's bounds): window j
// covers [j*s - p, j*s - p + k - 1] and j < O. Operands are non-negative where divided.
__device__ __forceinline__ int32_t window_lo(int32_t x, int32_t k, int32_t s, int32_t p) {
  const int32_t low = x + p - k + 1;
  return low <= 0 ? 0 : (low - 1) / s + 1;
}
__device__ __forceinline__ int32_t window_hi(int32_t x, int32_t s, int32_t p, int32_t O) {
  const int32_t q = (x + p) / s;
  return q < O - 1 ? q : O - 1;
}

// Windows of an axis that can meet a tile of T positions: their starts j*s lie in an interval
// of T + k - 2 (host and device).
__host__ __device__ inline int32_t max_windows(int32_t T, int32_t k, int32_t s) {
  return (T + k - 2) / s + 1;
}

struct Tiles {
  int32_t nd, nh, nw;  // tiles per axis
  int32_t cd, ch, cw;  // the shared-memory window grid (max_windows per axis)
};

template <typename scalar_t, int V>
__host__ __device__ inline int64_t windows_bytes(const Tiles& t, int32_t C) {
  return int64_t(t.cd) * t.ch * t.cw * (C / V) * int64_t(sizeof(Run<scalar_t, V>) + sizeof(Run<uint8_t, V>));
}

// g (y's dtype) into gy for one tile per block; y, gout, arg, gy channels_last_3d, C % V == 0,
// 16-byte aligned (the caller's dispatch_shape), every flat index < 2^31 / C positions.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
pool_gather_tiles_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ gout,
                         const uint8_t* __restrict__ arg, scalar_t* __restrict__ gy,
                         ParamPtrs<acc_t> pp, PoolGeom g, int32_t C, Tiles t) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int32_t cv = C / V;  // channel vectors per position
  const int32_t wins = t.cd * t.ch * t.cw;
  auto* sg = reinterpret_cast<Run<scalar_t, V>*>(smem);  // [window][vector], 16-byte runs
  auto* sa = reinterpret_cast<Run<uint8_t, V>*>(smem + int64_t(wins) * cv * sizeof(Run<scalar_t, V>));
  acc_t* sm = reinterpret_cast<acc_t*>(smem + windows_bytes<scalar_t, V>(t, C));  // [3][C]
  const int32_t D = int32_t(g.D), H = int32_t(g.H), W = int32_t(g.W);
  const int32_t OD = int32_t(g.OD), OH = int32_t(g.OH), OW = int32_t(g.OW);
  int32_t b = blockIdx.x;
  const int32_t tw = b % t.nw;
  b /= t.nw;
  const int32_t th = b % t.nh;
  b /= t.nh;
  const int32_t td = b % t.nd;
  const int64_t n = b / t.nd;
  const int32_t d0 = td * kTD, h0 = th * kTH, w0 = tw * kTW;
  const int32_t ld = window_lo(d0, g.k[0], g.s[0], g.p[0]);
  const int32_t lh = window_lo(h0, g.k[1], g.s[1], g.p[1]);
  const int32_t lw = window_lo(w0, g.k[2], g.s[2], g.p[2]);
  const int32_t wd = window_hi(min(d0 + kTD, D) - 1, g.s[0], g.p[0], OD) - ld + 1;
  const int32_t wh = window_hi(min(h0 + kTH, H) - 1, g.s[1], g.p[1], OH) - lh + 1;
  const int32_t ww = window_hi(min(w0 + kTW, W) - 1, g.s[2], g.p[2], OW) - lw + 1;
  // (wd, wh, ww: the tile's window counts per axis)
  // the windows' rows: consecutive threads, consecutive 16-byte runs of (ow, c)
  const int32_t items = max(wd, 0) * max(wh, 0) * max(ww, 0) * cv;
  for (int32_t i = threadIdx.x; i < items; i += blockDim.x) {
    int32_t r = i;
    const int32_t v = r % cv;
    r /= cv;
    const int32_t x = r % ww;
    r /= ww;
    const int32_t yy = r % wh, z = r / wh;
    const int64_t o = (((n * OD + ld + z) * OH + lh + yy) * OW + lw + x) * C + int64_t(v) * V;
    const int32_t s = ((z * t.ch + yy) * t.cw + x) * cv + v;
    sg[s] = load_run<V>(gout + o);
    sa[s] = load_run<V>(arg + o);
  }
  for (int32_t c = threadIdx.x; c < C; c += blockDim.x) {
    const ChanParams<acc_t> q = pp.get(c);
    sm[c] = q.m;
    sm[C + c] = q.sc;
    sm[2 * C + c] = q.b;
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < kTD * kTH * kTW * cv; i += blockDim.x) {
    const int32_t v = i % cv, pos = i / cv;
    const int32_t x = w0 + pos % kTW, yy = h0 + (pos / kTW) % kTH, z = d0 + pos / (kTW * kTH);
    if (x >= W || yy >= H || z >= D) continue;
    const int32_t od0 = window_lo(z, g.k[0], g.s[0], g.p[0]), od1 = window_hi(z, g.s[0], g.p[0], OD);
    const int32_t oh0 = window_lo(yy, g.k[1], g.s[1], g.p[1]), oh1 = window_hi(yy, g.s[1], g.p[1], OH);
    const int32_t ow0 = window_lo(x, g.k[2], g.s[2], g.p[2]), ow1 = window_hi(x, g.s[2], g.p[2], OW);
    acc_t sum[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum[j] = acc_t(0);
    for (int32_t od = od0; od <= od1; ++od)
      for (int32_t oh = oh0; oh <= oh1; ++oh)
        for (int32_t ow = ow0; ow <= ow1; ++ow) {
          const int k = ((z - (od * g.s[0] - g.p[0])) * g.k[1] + (yy - (oh * g.s[1] - g.p[1]))) *
                            g.k[2] + (x - (ow * g.s[2] - g.p[2]));
          const int32_t s = (((od - ld) * t.ch + (oh - lh)) * t.cw + (ow - lw)) * cv + v;
          const Run<uint8_t, V> ar = sa[s];
          const Run<scalar_t, V> gr = sg[s];
#pragma unroll
          for (int j = 0; j < V; ++j)
            if (ar.v[j] == k) sum[j] += static_cast<acc_t>(gr.v[j]);
        }
    const int64_t yi = (((n * D + z) * H + yy) * W + x) * C + int64_t(v) * V;
    const Run<scalar_t, V> yr = load_run<V>(y + yi);
    Run<scalar_t, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int32_t c = v * V + j;
      const acc_t zz = bn_pre_act<acc_t>(static_cast<acc_t>(yr.v[j]), sm[c], sm[C + c], sm[2 * C + c],
                                         acc_t(0));
      out.v[j] = static_cast<scalar_t>(bn_masked_grad<true>(sum[j], zz));
    }
    store_run<V>(gy + yi, out);
  }
}

inline bool asked() {
  const char* v = std::getenv("MED3D_EXT_POOL_GATHER");
  return v != nullptr && std::strcmp(v, "tiles") == 0;
}

// Launches the tiled gather for a vectorised channels_last_3d backward (V > 1) when asked and
// its shared memory fits; false otherwise (the caller runs PoolGatherOp).
template <typename scalar_t, typename acc_t, int V>
bool launch(const at::Tensor& y, const at::Tensor& grad_out, const at::Tensor& argmax,
            at::Tensor& grad_y, const ParamPtrs<acc_t>& pp, const PoolGeom& g,
            cudaStream_t stream) {
  if constexpr (V == 1) {
    return false;
  } else {
    if (!asked() || !is_channels_last_3d(y)) return false;
    const int64_t N = y.size(0), C = y.size(1);
    if (C % V != 0 || y.numel() >= (int64_t(1) << 31) || grad_out.numel() >= (int64_t(1) << 31))
      return false;
    Tiles t;
    t.nd = int32_t(ceil_div(g.D, int64_t(kTD)));
    t.nh = int32_t(ceil_div(g.H, int64_t(kTH)));
    t.nw = int32_t(ceil_div(g.W, int64_t(kTW)));
    t.cd = max_windows(kTD, g.k[0], g.s[0]);
    t.ch = max_windows(kTH, g.k[1], g.s[1]);
    t.cw = max_windows(kTW, g.k[2], g.s[2]);
    const int64_t smem = windows_bytes<scalar_t, V>(t, int32_t(C)) + 3 * C * int64_t(sizeof(acc_t));
    const int64_t blocks = N * t.nd * t.nh * t.nw;
    if (smem > kSmemBudget || blocks >= (int64_t(1) << 31) || blocks == 0) return false;
    pool_gather_tiles_kernel<scalar_t, acc_t, V><<<unsigned(blocks), kThreads, size_t(smem), stream>>>(
        y.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
        argmax.const_data_ptr<uint8_t>(), grad_y.data_ptr<scalar_t>(), pp, g, int32_t(C), t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

}  // namespace pool_tiles
}  // namespace med3d_ext
