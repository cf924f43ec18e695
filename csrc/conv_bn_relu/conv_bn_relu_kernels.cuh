// CUDA kernels of the conv_bn_relu3d epilogue and its backward (see conv_bn_relu.h for the math).
//
// Layouts: contiguous tensors are (N*C planes, S) and are walked plane by plane with the
// plane's channel parameters in registers; channels_last_3d tensors are (M rows, C) and are
// walked by a 2-D block whose x threads own fixed channel vectors (their parameters loaded once
// per thread) and whose y threads stride over rows. Loads and stores are 128-bit vectors of
// V = 16 / sizeof(scalar_t) elements whenever the pointers are 16-byte aligned and the
// contiguous extent (S or C) is a multiple of V; otherwise V = 1.
#pragma once

#include <type_traits>

#include "conv_bn_relu.h"
#include "../common/cuda_utils.cuh"

namespace med3d_ext {
namespace cbr {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <int V, typename T>
__device__ __forceinline__ void store(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Rows whose loads a channels_last thread keeps in flight at once (see BackwardAcc).
constexpr int kRowsInFlight = 4;

// Ops and accumulators that split their work into fetch<V>(i) -> Frag (the loads) and a second
// step on the Frag declare `static constexpr bool kFetch = true`; the channels_last drivers then
// issue kRowsInFlight rows' loads before using any. Others (the max-pool's gathers, whose loads
// depend on an argmax they read first) run a row at a time.
template <class T, class = void>
struct Fetches : std::false_type {};
template <class T>
struct Fetches<T, std::void_t<decltype(T::kFetch)>> : std::bool_constant<T::kFetch> {};

// Per-channel parameters of every pass. Forward uses m, sc, b; backward adds A, k1, Bp.
template <typename acc_t>
struct ChanParams {
  acc_t m, sc, b, A, k1, Bp;
};

template <typename acc_t>
struct ParamPtrs {
  // Null stands for mean 0, invstd 1, weight 1, bias 0 (conv_bias_relu3d's epilogue passes
  // only the bias); the statistics pass sets only mean (its shift).
  const acc_t *mean, *invstd, *w, *b;
  const acc_t* coef;  // (C, 3): A, k1, Bp; null in the forward and reduce passes
  __device__ __forceinline__ ChanParams<acc_t> get(int64_t c) const {
    ChanParams<acc_t> p;
    p.m = mean ? mean[c] : acc_t(0);
    p.sc = (w ? w[c] : acc_t(1)) * (invstd ? invstd[c] : acc_t(1));
    p.b = b ? b[c] : acc_t(0);
    if (coef) {
      p.A = coef[3 * c];
      p.k1 = coef[3 * c + 1];
      p.Bp = coef[3 * c + 2];
    } else {
      p.A = p.k1 = p.Bp = acc_t(0);
    }
    return p;
  }
};

// out = act(bn(y) [+ r])
template <typename scalar_t, typename acc_t, bool kRelu, bool kRes>
struct ForwardOp {
  const scalar_t* y;
  const scalar_t* r;
  scalar_t* out;
  static constexpr bool kFetch = true;
  template <int V>
  struct Frag {
    Vec<scalar_t, V> y, r;
  };
  template <int V>
  __device__ __forceinline__ Frag<V> fetch(int64_t i) const {
    Frag<V> f;
    f.y = load<V>(y + i);
    if constexpr (kRes) f.r = load<V>(r + i);
    return f;
  }
  template <int V, int PS>
  __device__ __forceinline__ void apply(int64_t i, const Frag<V>& f,
                                        const ChanParams<acc_t>* p) const {
    Vec<scalar_t, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const auto& q = p[j * PS];
      const acc_t res = kRes ? static_cast<acc_t>(f.r.v[j]) : acc_t(0);
      ov.v[j] = static_cast<scalar_t>(
          bn_act<kRelu>(bn_pre_act<acc_t>(static_cast<acc_t>(f.y.v[j]), q.m, q.sc, q.b, res)));
    }
    store<V>(out + i, ov);
  }
  template <int V, int PS>
  __device__ __forceinline__ void operator()(int64_t i, const ChanParams<acc_t>* p) const {
    apply<V, PS>(i, fetch<V>(i), p);
  }
};

// grad_y = A (g - k1) - Bp (y - mean), g read back from grad_residual (kRes) or recomputed.
template <typename scalar_t, typename acc_t, bool kRelu, bool kRes>
struct BackwardApplyOp {
  const scalar_t* dout;
  const scalar_t* y;
  const scalar_t* gr;
  scalar_t* gy;
  static constexpr bool kFetch = true;
  template <int V>
  struct Frag {
    Vec<scalar_t, V> y, d;
  };
  template <int V>
  __device__ __forceinline__ Frag<V> fetch(int64_t i) const {
    Frag<V> f;
    f.y = load<V>(y + i);
    f.d = load<V>((kRes ? gr : dout) + i);
    return f;
  }
  template <int V, int PS>
  __device__ __forceinline__ void apply(int64_t i, const Frag<V>& f,
                                        const ChanParams<acc_t>* p) const {
    Vec<scalar_t, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const auto& q = p[j * PS];
      const acc_t yy = static_cast<acc_t>(f.y.v[j]);
      acc_t g = static_cast<acc_t>(f.d.v[j]);
      if constexpr (!kRes) g = bn_masked_grad<kRelu>(g, bn_pre_act<acc_t>(yy, q.m, q.sc, q.b, acc_t(0)));
      ov.v[j] = static_cast<scalar_t>(bn_grad_input<acc_t>(g, yy, q.m, q.A, q.k1, q.Bp));
    }
    store<V>(gy + i, ov);
  }
  template <int V, int PS>
  __device__ __forceinline__ void operator()(int64_t i, const ChanParams<acc_t>* p) const {
    apply<V, PS>(i, fetch<V>(i), p);
  }
};

// ---- elementwise drivers -------------------------------------------------------------------

template <typename acc_t, int V, class Op>
__global__ void elementwise_nchw(Op op, ParamPtrs<acc_t> pp, int64_t C, int64_t S,
                                 int64_t planes) {
  const int64_t sv = S / V;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const ChanParams<acc_t> p = pp.get(plane % C);
    const int64_t base = plane * S;
    for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < sv;
         v += int64_t(gridDim.x) * blockDim.x)
      op.template operator()<V, 0>(base + v * V, &p);
  }
}

template <typename acc_t, int V, class Op>
__global__ void elementwise_nhwc(Op op, ParamPtrs<acc_t> pp, int64_t M, int64_t C) {
  const int64_t cv = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (cv * V >= C) return;
  ChanParams<acc_t> p[V];
#pragma unroll
  for (int j = 0; j < V; ++j) p[j] = pp.get(cv * V + j);
  const int64_t stride = int64_t(gridDim.y) * blockDim.y, col = cv * V;
  int64_t r = blockIdx.y * int64_t(blockDim.y) + threadIdx.y;
  if constexpr (Fetches<Op>::value)  // kRowsInFlight rows' loads issued before any is used
    for (; r + (kRowsInFlight - 1) * stride < M; r += kRowsInFlight * stride) {
      typename Op::template Frag<V> f[kRowsInFlight];
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) f[k] = op.template fetch<V>((r + k * stride) * C + col);
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) op.template apply<V, 1>((r + k * stride) * C + col, f[k], p);
    }
  for (; r < M; r += stride) op.template operator()<V, 1>(r * C + col, p);
}

// ---- backward reduction: per-channel sum of g and g * (y - mean) ------------------------------

// One masked-gradient value. kRes (a residual layer): the mask comes from the layer's output
// rv (relu_out: out > 0 iff z > 0) and g is stored as grad_residual (the rounded value read
// back, so the sums match what the apply pass will read); else the mask is recomputed from y.
template <typename scalar_t, typename acc_t, bool kRelu, bool kRes>
__device__ __forceinline__ void reduce_one(scalar_t d, scalar_t yv, scalar_t rv, scalar_t* gr,
                                           const ChanParams<acc_t>& q, acc_t& s0, acc_t& s1) {
  const acc_t yy = static_cast<acc_t>(yv);
  const acc_t z = kRes ? static_cast<acc_t>(rv) : bn_pre_act<acc_t>(yy, q.m, q.sc, q.b, acc_t(0));
  acc_t g = bn_masked_grad<kRelu>(static_cast<acc_t>(d), z);
  if constexpr (kRes) {
    const scalar_t gs = static_cast<scalar_t>(g);
    *gr = gs;
    g = static_cast<acc_t>(gs);
  }
  s0 += g;
  s1 += g * (yy - q.m);
}

// Accumulators of the reduction kernels: add the two per-channel sums of V elements at i
// (PS = 0: one channel for the whole vector, the contiguous layout; PS = 1: V channels). Each
// splits its work in two so that reduce_nhwc can keep several rows' loads in flight: fetch<V>(i)
// issues the loads into a Frag, consume<V, PS>(i, frag, ...) does the math (and any store). A
// reduction pass is memory-bound, and one 16-byte load in flight per thread at a time left the
// memory system mostly idle (H200 profile: 35 us per statistics pass, ~5x the bytes' time).
template <typename scalar_t, typename acc_t, bool kRelu, bool kRes>
struct BackwardAcc {  // sum g, sum g * (y - mean); writes grad_residual when kRes
  const scalar_t *dout, *y, *r;  // r: relu_out when kRes
  scalar_t* gr;
  static constexpr bool kFetch = true;
  template <int V>
  struct Frag {
    Vec<scalar_t, V> d, y, r;
  };
  template <int V>
  __device__ __forceinline__ Frag<V> fetch(int64_t i) const {
    Frag<V> f;
    f.d = load<V>(dout + i);
    f.y = load<V>(y + i);
    if constexpr (kRes) f.r = load<V>(r + i);
    return f;
  }
  template <int V, int PS>
  __device__ __forceinline__ void consume(int64_t i, const Frag<V>& f, const ChanParams<acc_t>* p,
                                          acc_t* s0, acc_t* s1) const {
    Vec<scalar_t, V> gv;
#pragma unroll
    for (int j = 0; j < V; ++j)
      reduce_one<scalar_t, acc_t, kRelu, kRes>(f.d.v[j], f.y.v[j], kRes ? f.r.v[j] : scalar_t(0),
                                               &gv.v[j], p[j * PS], s0[j * PS], s1[j * PS]);
    if constexpr (kRes) store<V>(gr + i, gv);
  }
  template <int V, int PS>
  __device__ __forceinline__ void operator()(int64_t i, const ChanParams<acc_t>* p, acc_t* s0,
                                             acc_t* s1) const {
    consume<V, PS>(i, fetch<V>(i), p, s0, s1);
  }
  // channel c's parameters, read once per thread by the reduction drivers
  __device__ __forceinline__ ChanParams<acc_t> params(const ParamPtrs<acc_t>& pp, int64_t c) const {
    return pp.get(c);
  }
};

// sum (y - K), sum (y - K)^2 with a per-channel shift K = y[0, c, 0, 0, 0] (ChanParams::m),
// read from y itself (stats_shift) rather than copied out by a kernel of its own first: one
// launch and a handful of host-side tensor ops less per BatchNorm layer.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t stats_shift(const scalar_t* y, int64_t c_stride, int64_t c) {
  return static_cast<acc_t>(y[c * c_stride]);
}

template <typename scalar_t, typename acc_t>
struct StatsAcc {
  const scalar_t* y;
  int64_t c_stride;  // y's channel stride: the shift of channel c is y[c * c_stride]
  static constexpr bool kFetch = true;
  template <int V>
  struct Frag {
    Vec<scalar_t, V> y;
  };
  template <int V>
  __device__ __forceinline__ Frag<V> fetch(int64_t i) const {
    return Frag<V>{load<V>(y + i)};
  }
  template <int V, int PS>
  __device__ __forceinline__ void consume(int64_t, const Frag<V>& f, const ChanParams<acc_t>* p,
                                          acc_t* s0, acc_t* s1) const {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t d = static_cast<acc_t>(f.y.v[j]) - p[j * PS].m;
      s0[j * PS] += d;
      s1[j * PS] += d * d;
    }
  }
  template <int V, int PS>
  __device__ __forceinline__ void operator()(int64_t i, const ChanParams<acc_t>* p, acc_t* s0,
                                             acc_t* s1) const {
    consume<V, PS>(i, fetch<V>(i), p, s0, s1);
  }
  __device__ __forceinline__ ChanParams<acc_t> params(const ParamPtrs<acc_t>&, int64_t c) const {
    ChanParams<acc_t> p{};
    p.m = stats_shift<scalar_t, acc_t>(y, c_stride, c);
    return p;
  }
};

// The reduction kernels write per-(channel, split) pairs of sums; the finishing kernels read
// them a warp per channel, so a channel's splits are adjacent: partial is (C, splits, 2).
__host__ __device__ __forceinline__ int64_t partial_index(int64_t c, int64_t split, int64_t splits) {
  return (c * splits + split) * 2;
}

// grid = (splits, min(C, 65535)); partial is (C, splits, 2). Blocks loop over channels, as
// gridDim.y is at most 65535 (a contiguous tensor of more channels failed to launch before).
template <typename acc_t, int V, class Acc>
__global__ void reduce_nchw(Acc acc, ParamPtrs<acc_t> pp, int64_t N, int64_t C, int64_t S,
                            acc_t* partial) {
  __shared__ acc_t shared[2][32];
  const int64_t sv = S / V, total = N * sv;
  const int64_t per = (total + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per, hi = min(total, lo + per);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // block-uniform
    const ChanParams<acc_t> p = acc.params(pp, c);
    acc_t s0 = 0, s1 = 0;
    for (int64_t v = lo + threadIdx.x; v < hi; v += blockDim.x) {
      const int64_t n = v / sv, i = (n * C + c) * S + (v - n * sv) * V;
      acc.template operator()<V, 0>(i, &p, &s0, &s1);
    }
    for (int d = 16; d > 0; d >>= 1) {
      s0 += __shfl_down_sync(0xffffffffu, s0, d);
      s1 += __shfl_down_sync(0xffffffffu, s1, d);
    }
    if (lane == 0) {
      shared[0][warp] = s0;
      shared[1][warp] = s1;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t t0 = 0, t1 = 0;
      for (int k = 0; k < warps; ++k) {
        t0 += shared[0][k];
        t1 += shared[1][k];
      }
      acc_t* out = partial + partial_index(c, blockIdx.x, gridDim.x);
      out[0] = t0;
      out[1] = t1;
    }
    __syncthreads();  // thread 0 has read `shared` before the next channel overwrites it
  }
}

// block = (TX channel vectors, TY rows), grid = (ceil(C / V / TX), splits); dynamic shared
// memory holds TX * TY * V * 2 accumulators; partial is (C, splits, 2).
template <typename acc_t, int V, class Acc>
__global__ void reduce_nhwc(Acc acc, ParamPtrs<acc_t> pp, int64_t M, int64_t C, acc_t* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t cv = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const bool valid = cv * V < C;
  acc_t s0[V], s1[V];
  ChanParams<acc_t> p[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s0[j] = s1[j] = acc_t(0);
    if (valid) p[j] = acc.params(pp, cv * V + j);
  }
  if (valid) {
    const int64_t stride = int64_t(gridDim.y) * blockDim.y, col = cv * V;
    int64_t row = blockIdx.y * int64_t(blockDim.y) + threadIdx.y;
    if constexpr (Fetches<Acc>::value)  // kRowsInFlight rows' loads issued before any is used
    for (; row + (kRowsInFlight - 1) * stride < M; row += kRowsInFlight * stride) {
      typename Acc::template Frag<V> f[kRowsInFlight];
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) f[k] = acc.template fetch<V>((row + k * stride) * C + col);
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k)
        acc.template consume<V, 1>((row + k * stride) * C + col, f[k], p, s0, s1);
    }
    for (; row < M; row += stride) acc.template operator()<V, 1>(row * C + col, p, s0, s1);
  }
  acc_t* mine = sm + (threadIdx.y * blockDim.x + threadIdx.x) * 2 * V;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mine[j] = s0[j];
    mine[V + j] = s1[j];
  }
  // Tree over the block's rows (fixed order, log2(blockDim.y) steps; any blockDim.y).
  int span = 1;
  while (span < int(blockDim.y)) span <<= 1;
  for (int stride = span >> 1; stride > 0; stride >>= 1) {
    __syncthreads();
    if (int(threadIdx.y) < stride && threadIdx.y + stride < blockDim.y) {
      const acc_t* other = mine + stride * blockDim.x * 2 * V;
#pragma unroll
      for (int j = 0; j < 2 * V; ++j) mine[j] += other[j];
    }
  }
  if (threadIdx.y != 0 || !valid) return;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc_t* out = partial + partial_index(cv * V + j, blockIdx.y, gridDim.y);
    out[0] = mine[j];
    out[1] = mine[V + j];
  }
}

// Sums of channel c's (splits) partial pairs, by one warp: lane l adds splits l, l + 32, ... in
// order, then a fixed shuffle tree. The order depends only on `splits` (a function of the shape
// and the SM count), so results are bitwise reproducible; and the dependent chain is splits / 32
// loads long, not splits (up to a few hundred: with ~1000 splits, the earlier one thread per
// channel spent tens of microseconds here, per BatchNorm layer and pass). Every lane gets the
// sums.
template <typename acc_t>
__device__ __forceinline__ void warp_sum_splits(const acc_t* __restrict__ partial, int64_t c,
                                                int64_t splits, acc_t& s0, acc_t& s1) {
  const acc_t* p = partial + partial_index(c, 0, splits);
  s0 = acc_t(0);
  s1 = acc_t(0);
  for (int64_t k = threadIdx.x & 31; k < splits; k += 32) {
    s0 += p[2 * k];
    s1 += p[2 * k + 1];
  }
  for (int d = 16; d > 0; d >>= 1) {
    s0 += __shfl_xor_sync(0xffffffffu, s0, d);
    s1 += __shfl_xor_sync(0xffffffffu, s1, d);
  }
}

// The finishing kernels run a warp per channel: block = kFinishWarps * 32 threads.
constexpr int kFinishWarps = 8;
inline int64_t finish_blocks(int64_t C) { return (C + kFinishWarps - 1) / kFinishWarps; }

// Channel of this warp in a finishing kernel (warp-uniform, so a whole warp returns together).
__device__ __forceinline__ int64_t finish_channel() {
  return int64_t(blockIdx.x) * kFinishWarps + (threadIdx.x >> 5);
}

// Merge the splits; write grad_bn_weight, grad_bn_bias and the apply coefficients.
template <typename acc_t>
__global__ void reduce_finish(const acc_t* partial, int64_t splits, int64_t C, acc_t n,
                              bool training, ParamPtrs<acc_t> pp, acc_t* grad_w, acc_t* grad_b,
                              acc_t* coef) {
  const int64_t c = finish_channel();
  if (c >= C) return;
  acc_t s0, s1;
  warp_sum_splits(partial, c, splits, s0, s1);
  if ((threadIdx.x & 31) != 0) return;
  const acc_t invstd = pp.invstd[c];
  const auto q = bn_bwd_coef<acc_t>(pp.w[c], invstd, s0, s1, n, training);
  grad_w[c] = s1 * invstd;
  grad_b[c] = s0;
  coef[3 * c] = q.A;
  coef[3 * c + 1] = q.k1;
  coef[3 * c + 2] = q.Bp;
}

// Forward statistics from the shifted sums: mean, invstd = 1 / sqrt(var + eps) and the
// unbiased variance (for the running-stat update).
template <typename scalar_t, typename acc_t>
__global__ void stats_finish(const acc_t* partial, int64_t splits, int64_t C, acc_t n,
                             const scalar_t* y, int64_t c_stride, double eps, acc_t* mean,
                             acc_t* invstd, acc_t* var_unbiased) {
  const int64_t c = finish_channel();
  if (c >= C) return;
  acc_t s0, s1;
  warp_sum_splits(partial, c, splits, s0, s1);
  if ((threadIdx.x & 31) != 0) return;
  const acc_t d = s0 / n;
  acc_t var = s1 / n - d * d;
  var = var > acc_t(0) ? var : acc_t(0);
  mean[c] = stats_shift<scalar_t, acc_t>(y, c_stride, c) + d;
  invstd[c] = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
  var_unbiased[c] = var * n / (n - acc_t(1));
}

}  // namespace cbr
}  // namespace med3d_ext
