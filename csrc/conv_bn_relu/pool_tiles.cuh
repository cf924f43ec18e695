// The stem max-pool's forward and its backward's gather pass by tiles (bn_relu_pool_cuda.cu),
// opt-in: MED3D_EXT_POOL_KERNEL=tiles, read at every call, until they have run on a GPU.
// channels_last_3d with 16-byte channel vectors (V > 1) only; anything else, or a tile whose
// shared memory would not fit, runs the elementwise kernels (PoolForwardOp, PoolGatherOp).
//
// Forward: PoolForwardOp (a thread per pooled position and channel vector) took 142 us at the
// benchmark's stem (ncu s19, H200), reading each conv output voxel ~3.4 times through L1/L2.
// Here a block takes kOD x kOH x kOW pooled positions of one sample, every channel, stages the
// conv output region their windows read in shared memory (loads contiguous along W and C), and
// runs pool_window_max (the CPU's and PoolForwardOp's window math) on the staged copy: its
// geometry's y strides are the stage's and its base pointer is offset so that tensor
// coordinates index the stage. The same outputs and argmax bit for bit.
//
// Backward gather: PoolGatherOp (one thread per 16-byte channel vector of y, the window walk of
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
//
// Where C / V divides 32 (the stem: 64 bf16 channels, 8 vectors), the kernel also adds
// BatchNorm's two backward sums (of g and g * (y - mean), from g as stored, as BackwardAcc adds
// them) per block and channel, in a fixed order (lanes, then warps), into the (C, blocks, 2)
// partials reduce_finish merges: the separate reduction pass, which read g and y again
// (72 us on the H200 at the stem, ncu s19), is not run. The sums' order differs from that pass's,
// so grad_bn_weight, grad_bn_bias and grad_y differ from the default path's by rounding.
#pragma once

#include <algorithm>

#include "bn_relu_pool.h"
#include "conv_bn_relu_launch.cuh"

namespace med3d_ext {
namespace pool_tiles {

using namespace cbr;

constexpr int64_t kSmemBudget = 40 * 1024;  // shared memory per block, under the 48 KB default

inline bool asked() { return env_equals("MED3D_EXT_POOL_KERNEL", "tiles"); }

// Block b's tile: its sample and its tile index per axis, for nd x nh x nw tiles per sample.
struct TileIndex {
  int64_t n;
  int32_t d, h, w;
};
__device__ __forceinline__ TileIndex tile_of(int32_t b, int32_t nd, int32_t nh, int32_t nw) {
  TileIndex t;
  t.w = b % nw;
  b /= nw;
  t.h = b % nh;
  b /= nh;
  t.d = b % nd;
  t.n = b / nd;
  return t;
}

// The C channels' BatchNorm mean, scale and bias into shared memory ([3][C]).
template <typename acc_t>
__device__ __forceinline__ void stage_params(const ParamPtrs<acc_t>& pp, int32_t C, acc_t* sm) {
  for (int32_t c = threadIdx.x; c < C; c += blockDim.x) {
    const ChanParams<acc_t> q = pp.get(c);
    sm[c] = q.m;
    sm[C + c] = q.sc;
    sm[2 * C + c] = q.b;
  }
}

// ---- forward ----

constexpr int kOD = 1, kOH = 2, kOW = 8;  // pooled positions per tile: 16
constexpr int kFwdThreads = 128;

struct FwdTiles {
  int32_t nd, nh, nw;  // tiles per axis
  int32_t rd, rh, rw;  // the staged region's extent per axis ((kO - 1) * s + k)
};

// out and arg (pooled, channels_last_3d) for one tile per block; y channels_last_3d; C % V == 0;
// 16-byte aligned; every flat index < 2^31.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kFwdThreads)
pool_forward_tiles_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                          uint8_t* __restrict__ arg, ParamPtrs<acc_t> pp, PoolGeom g, int32_t C,
                          FwdTiles t) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int32_t cv = C / V;
  auto* stage = reinterpret_cast<Run<scalar_t, V>*>(smem);  // [rd][rh][rw][cv]
  const int64_t stage_runs = int64_t(t.rd) * t.rh * t.rw * cv;
  acc_t* sm = reinterpret_cast<acc_t*>(smem + stage_runs * sizeof(Run<scalar_t, V>));  // [3][C]
  const int32_t D = int32_t(g.D), H = int32_t(g.H), W = int32_t(g.W);
  const int32_t OD = int32_t(g.OD), OH = int32_t(g.OH), OW = int32_t(g.OW);
  const TileIndex tile = tile_of(blockIdx.x, t.nd, t.nh, t.nw);
  const int64_t n = tile.n;
  const int32_t od0 = tile.d * kOD, oh0 = tile.h * kOH, ow0 = tile.w * kOW;
  // the region's first voxel (tensor coordinates; may lie in the padding)
  const int32_t rd0 = od0 * g.s[0] - g.p[0], rh0 = oh0 * g.s[1] - g.p[1], rw0 = ow0 * g.s[2] - g.p[2];
  for (int32_t i = threadIdx.x; i < stage_runs; i += blockDim.x) {
    int32_t r = i;
    const int32_t v = r % cv;
    r /= cv;
    const int32_t x = r % t.rw;
    r /= t.rw;
    const int32_t yy = r % t.rh, z = r / t.rh;
    const int32_t d = rd0 + z, h = rh0 + yy, w = rw0 + x;
    // outside y: never read (pool_window_max skips such positions); left as they are
    if (d >= 0 && d < D && h >= 0 && h < H && w >= 0 && w < W)
      stage[i] = load_run<V>(y + (((n * D + d) * H + h) * W + w) * C + int64_t(v) * V);
  }
  stage_params(pp, C, sm);
  __syncthreads();
  // pool_window_max reads y[d * ys0 + h * ys1 + w * ys2] for in-tensor (d, h, w): with the
  // stage's strides and this base, that is the stage's element for (d - rd0, h - rh0, w - rw0)
  PoolGeom gs = g;
  gs.ys[2] = C;
  gs.ys[1] = int64_t(t.rw) * C;
  gs.ys[0] = int64_t(t.rh) * t.rw * C;
  const scalar_t* base = reinterpret_cast<const scalar_t*>(stage) -
                         (rd0 * gs.ys[0] + rh0 * gs.ys[1] + rw0 * gs.ys[2]);
  for (int32_t i = threadIdx.x; i < kOD * kOH * kOW * cv; i += blockDim.x) {
    const int32_t v = i % cv, pos = i / cv;
    const int32_t ow = ow0 + pos % kOW, oh = oh0 + (pos / kOW) % kOH, od = od0 + pos / (kOW * kOH);
    if (ow >= OW || oh >= OH || od >= OD) continue;
    acc_t m[V], sc[V], bb[V], best[V];
    uint8_t a[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      m[j] = sm[v * V + j];
      sc[j] = sm[C + v * V + j];
      bb[j] = sm[2 * C + v * V + j];
    }
    pool_window_max<V, scalar_t, acc_t, int32_t>(base + v * V, 1, gs, od, oh, ow, m, sc, bb, best, a);
    Run<scalar_t, V> ov;
    Run<uint8_t, V> ar;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      ov.v[j] = static_cast<scalar_t>(bn_act<true>(best[j]));
      ar.v[j] = a[j];
    }
    const int64_t o = (((n * OD + od) * OH + oh) * OW + ow) * C + int64_t(v) * V;
    store_run<V>(out + o, ov);
    store_run<V>(arg + o, ar);
  }
}

// Launches the tiled forward when asked and it fits; false otherwise (the caller runs
// PoolForwardOp).
template <typename scalar_t, typename acc_t, int V>
bool launch_forward(const at::Tensor& y, at::Tensor& out, at::Tensor& argmax,
                    const ParamPtrs<acc_t>& pp, const PoolGeom& g, cudaStream_t stream) {
  if constexpr (V == 1) {
    return false;
  } else {
    if (!asked() || !is_channels_last_3d(y) || !is_channels_last_3d(out)) return false;
    const int64_t N = y.size(0), C = y.size(1);
    if (C % V != 0 || y.numel() >= (int64_t(1) << 31) || out.numel() >= (int64_t(1) << 31))
      return false;
    FwdTiles t;
    t.nd = int32_t(ceil_div(g.OD, int64_t(kOD)));
    t.nh = int32_t(ceil_div(g.OH, int64_t(kOH)));
    t.nw = int32_t(ceil_div(g.OW, int64_t(kOW)));
    t.rd = (kOD - 1) * g.s[0] + g.k[0];
    t.rh = (kOH - 1) * g.s[1] + g.k[1];
    t.rw = (kOW - 1) * g.s[2] + g.k[2];
    const int64_t smem = int64_t(t.rd) * t.rh * t.rw * (C / V) * int64_t(sizeof(Run<scalar_t, V>)) +
                         3 * C * int64_t(sizeof(acc_t));
    const int64_t blocks = N * t.nd * t.nh * t.nw;
    if (smem > kSmemBudget || blocks >= (int64_t(1) << 31) || blocks == 0) return false;
    // pool_window_max's 32-bit offsets from the shifted base: tensor coordinates times the
    // stage's strides
    const int64_t reach = (g.D + t.rd) * t.rh * t.rw * C + (g.H + t.rh) * t.rw * C + (g.W + t.rw) * C;
    if (reach >= (int64_t(1) << 31)) return false;
    pool_forward_tiles_kernel<scalar_t, acc_t, V>
        <<<unsigned(blocks), kFwdThreads, size_t(smem), stream>>>(
            y.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), argmax.data_ptr<uint8_t>(), pp,
            g, int32_t(C), t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

// ---- backward gather ----

constexpr int kTD = 2, kTH = 4, kTW = 16;  // positions per tile: 128
constexpr int kThreads = 256;

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

// Whether the kernel adds the BatchNorm sums: a thread's channel vector is then the same in all
// its items (kThreads % cv == 0) and the lanes sharing one are xor-partners (cv divides 32).
__host__ __device__ inline bool sums_fit(int32_t cv) { return cv > 0 && 32 % cv == 0; }

// g (y's dtype) into gy for one tile per block; y, gout, arg, gy channels_last_3d, C % V == 0,
// 16-byte aligned (the caller's dispatch_shape), every flat index < 2^31 / C positions.
// partial: (C, gridDim.x, 2) BatchNorm sums (sums_fit), or null.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
pool_gather_tiles_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ gout,
                         const uint8_t* __restrict__ arg, scalar_t* __restrict__ gy,
                         ParamPtrs<acc_t> pp, PoolGeom g, int32_t C, Tiles t,
                         acc_t* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int32_t cv = C / V;  // channel vectors per position
  const int32_t wins = t.cd * t.ch * t.cw;
  auto* sg = reinterpret_cast<Run<scalar_t, V>*>(smem);  // [window][vector], 16-byte runs
  auto* sa = reinterpret_cast<Run<uint8_t, V>*>(smem + int64_t(wins) * cv * sizeof(Run<scalar_t, V>));
  acc_t* sm = reinterpret_cast<acc_t*>(smem + windows_bytes<scalar_t, V>(t, C));  // [3][C]
  const int32_t D = int32_t(g.D), H = int32_t(g.H), W = int32_t(g.W);
  const int32_t OD = int32_t(g.OD), OH = int32_t(g.OH), OW = int32_t(g.OW);
  const TileIndex tile = tile_of(blockIdx.x, t.nd, t.nh, t.nw);
  const int64_t n = tile.n;
  const int32_t d0 = tile.d * kTD, h0 = tile.h * kTH, w0 = tile.w * kTW;
  // the tile's windows: from the first position's first to the last position's last
  int32_t ld, lh, lw, hd, hh, hw, unused;
  pool_windows_of<int32_t>(g, 0, d0, OD, ld, unused);
  pool_windows_of<int32_t>(g, 1, h0, OH, lh, unused);
  pool_windows_of<int32_t>(g, 2, w0, OW, lw, unused);
  pool_windows_of<int32_t>(g, 0, min(d0 + kTD, D) - 1, OD, unused, hd);
  pool_windows_of<int32_t>(g, 1, min(h0 + kTH, H) - 1, OH, unused, hh);
  pool_windows_of<int32_t>(g, 2, min(w0 + kTW, W) - 1, OW, unused, hw);
  const int32_t wd = hd - ld + 1, wh = hh - lh + 1, ww = hw - lw + 1;
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
  stage_params(pp, C, sm);
  __syncthreads();
  acc_t t0[V], t1[V];  // this thread's BatchNorm sums (one channel vector: see sums_fit)
#pragma unroll
  for (int j = 0; j < V; ++j) t0[j] = t1[j] = acc_t(0);
  for (int32_t i = threadIdx.x; i < kTD * kTH * kTW * cv; i += blockDim.x) {
    const int32_t v = i % cv, pos = i / cv;
    const int32_t x = w0 + pos % kTW, yy = h0 + (pos / kTW) % kTH, z = d0 + pos / (kTW * kTH);
    if (x >= W || yy >= H || z >= D) continue;
    int32_t od0, od1, oh0, oh1, ow0, ow1;
    pool_windows_of<int32_t>(g, 0, z, OD, od0, od1);
    pool_windows_of<int32_t>(g, 1, yy, OH, oh0, oh1);
    pool_windows_of<int32_t>(g, 2, x, OW, ow0, ow1);
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
      const acc_t gv = static_cast<acc_t>(out.v[j]);  // g as stored, as BackwardAcc reads it
      t0[j] += gv;
      t1[j] += gv * (static_cast<acc_t>(yr.v[j]) - sm[c]);
    }
    store_run<V>(gy + yi, out);
  }
  if (partial == nullptr) return;
  // lanes l, l + cv, l + 2cv, ... hold the same vector: fold them onto lanes 0 .. cv - 1
  for (int off = cv; off < 32; off <<= 1) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      t0[j] += __shfl_xor_sync(0xffffffffu, t0[j], off);
      t1[j] += __shfl_xor_sync(0xffffffffu, t1[j], off);
    }
  }
  // then the warps, in order, through the (no longer needed) window grid's memory
  __syncthreads();
  acc_t* red = reinterpret_cast<acc_t*>(smem);  // [warp][2][C]
  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane < cv) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      red[(warp * 2) * C + lane * V + j] = t0[j];
      red[(warp * 2 + 1) * C + lane * V + j] = t1[j];
    }
  }
  __syncthreads();
  for (int32_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t s0 = acc_t(0), s1 = acc_t(0);
    for (int32_t w = 0; w < warps; ++w) {
      s0 += red[(w * 2) * C + c];
      s1 += red[(w * 2 + 1) * C + c];
    }
    acc_t* o = partial + partial_index(c, blockIdx.x, gridDim.x);
    o[0] = s0;
    o[1] = s1;
  }
}

// Launches the tiled gather for a vectorised channels_last_3d backward (V > 1) when asked and
// its shared memory fits. Returns -1 when it did not run (the caller runs PoolGatherOp), 0 when it
// ran without the BatchNorm sums (the caller reduces), else the number of splits it wrote into
// `partial` (allocated here, (C, splits, 2)) for reduce_finish.
template <typename scalar_t, typename acc_t, int V>
int64_t launch_gather(const at::Tensor& y, const at::Tensor& grad_out, const at::Tensor& argmax,
               at::Tensor& grad_y, const ParamPtrs<acc_t>& pp, const PoolGeom& g,
               at::Tensor& partial, cudaStream_t stream) {
  if constexpr (V == 1) {
    return -1;
  } else {
    if (!asked() || !is_channels_last_3d(y)) return -1;
    const int64_t N = y.size(0), C = y.size(1);
    if (C % V != 0 || y.numel() >= (int64_t(1) << 31) || grad_out.numel() >= (int64_t(1) << 31))
      return -1;
    Tiles t;
    t.nd = int32_t(ceil_div(g.D, int64_t(kTD)));
    t.nh = int32_t(ceil_div(g.H, int64_t(kTH)));
    t.nw = int32_t(ceil_div(g.W, int64_t(kTW)));
    t.cd = max_windows(kTD, g.k[0], g.s[0]);
    t.ch = max_windows(kTH, g.k[1], g.s[1]);
    t.cw = max_windows(kTW, g.k[2], g.s[2]);
    const bool sums = sums_fit(int32_t(C / V));
    // the windows and the parameters; the sums' warp table reuses the windows' memory after
    const int64_t smem = std::max<int64_t>(
        windows_bytes<scalar_t, V>(t, int32_t(C)) + 3 * C * int64_t(sizeof(acc_t)),
        sums ? int64_t(kThreads / 32) * 2 * C * int64_t(sizeof(acc_t)) : 0);
    const int64_t blocks = N * t.nd * t.nh * t.nw;
    if (smem > kSmemBudget || blocks >= (int64_t(1) << 31) || blocks == 0) return -1;
    if (sums) partial = at::empty({C * blocks * 2}, partial.options());
    pool_gather_tiles_kernel<scalar_t, acc_t, V><<<unsigned(blocks), kThreads, size_t(smem), stream>>>(
        y.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
        argmax.const_data_ptr<uint8_t>(), grad_y.data_ptr<scalar_t>(), pp, g, int32_t(C), t,
        sums ? partial.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return sums ? blocks : 0;
  }
}

}  // namespace pool_tiles
}  // namespace med3d_ext
