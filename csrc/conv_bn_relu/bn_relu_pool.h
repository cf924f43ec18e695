// The ResNet stem's epilogue fused with its max-pool: maxpool3d(relu(batch_norm(y))), CPU and
// CUDA, forward and backward (ops conv_bn_relu_maxpool3d / bn_relu_maxpool_backward, schemas
// in csrc/registration.cpp).
//
// Why: the stem's conv output is the largest activation of the network (8 x 64 x 32 x 64 x 64
// at the perf-baselines shape: 268 MB in bf16). Unfused, the normalised + ReLU output is written
// (268 MB), read by the pool, which writes int64 indices (134 MB), and both are kept for
// backward; the pool backward then writes a full-size, mostly-zero gradient. Fused:
//   forward   out[o] = relu(max_{p in window(o)} z(p)),  z(p) = (y(p) - mean) * w * invstd + b
//             argmax[o] = the window offset (uint8) of that max; nothing else is written
//   backward  g(p) = [z(p) > 0] * sum of grad_out[o] over the windows o whose argmax is p
//             (CUDA gathers it into grad_y; the CPU scatters it per plane, in the same order), then
//             the usual BatchNorm backward (one reduction pass and one apply pass,
//             conv_bn_relu.h) with that g.
// max(relu(z)) = relu(max(z)) because ReLU is monotonic; ties and NaN follow max_pool3d (the
// first maximum in window order wins, a NaN wins). In low precision the max is taken on the
// fp32 pre-activation, before rounding, so bf16 ties that max_pool3d would break by position
// go to the larger true value (an equally valid subgradient).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "conv_bn_relu.h"
#include "../common/run.h"

namespace med3d_ext {

// Pool geometry: input (y) spatial D, H, W; output OD, OH, OW; per-axis kernel, stride, padding
// (dilation 1, floor mode). Strides are element strides of y / out along d, h, w; a (n, c)
// base pointer is passed separately, so the same code serves contiguous and channels_last_3d.
struct PoolGeom {
  int64_t D, H, W, OD, OH, OW;
  int k[3], s[3], p[3];
  int64_t ys[3], os[3];
};

// Kernels up to 6^3 = 216 window offsets fit a uint8 argmax.
constexpr int kMaxPoolWindow = 255;

// The per-window math, for V adjacent channels at once (channel stride cs between them, 1 when
// V > 1, which the loads below rely on; cs is kept for the signature's sake): the
// CPU calls it with V = 1, the CUDA kernels with a vector of channels of a channels_last_3d row.
// index_t is the type of the window coordinates and of the in-plane offsets: int64_t on the CPU;
// int32_t on the GPU when the tensors' sizes leave it room (pool_index_fits_int32), where 64-bit
// divisions and products are emulated by many instructions and double the registers.

// Loads and stores of V channels: Run (../common/run.h). V > 1 only in the CUDA kernels'
// channels_last_3d path, where the V channels are adjacent (channel stride 1), every channel
// group's offset is a multiple of V, and the dispatch checked that the base pointers are 16-byte
// aligned (dispatch_shape).

// Max of z over the window of output (od, oh, ow) and its window offset, for each of the V
// channels; y points at (n, first channel). mean/scale/bias: the V channels' parameters.
template <int V, typename scalar_t, typename acc_t, typename index_t>
M3D_HOST_DEVICE void pool_window_max(const scalar_t* y, int64_t cs, const PoolGeom& g, index_t od,
                                     index_t oh, index_t ow, const acc_t* mean,
                                     const acc_t* scale, const acc_t* bias, acc_t* best,
                                     uint8_t* arg) {
  const index_t d0 = od * index_t(g.s[0]) - index_t(g.p[0]),
                h0 = oh * index_t(g.s[1]) - index_t(g.p[1]),
                w0 = ow * index_t(g.s[2]) - index_t(g.p[2]);
  const index_t D = index_t(g.D), H = index_t(g.H), W = index_t(g.W);
  const index_t ys0 = index_t(g.ys[0]), ys1 = index_t(g.ys[1]), ys2 = index_t(g.ys[2]);
  // (the first in-bounds position always sets them; initialised for the compiler's sake)
  M3D_UNROLL
  for (int j = 0; j < V; ++j) {
    best[j] = acc_t(0);
    arg[j] = 0;
  }
  bool first = true;
  for (int kd = 0; kd < g.k[0]; ++kd) {
    const index_t d = d0 + kd;
    if (d < 0 || d >= D) continue;
    for (int kh = 0; kh < g.k[1]; ++kh) {
      const index_t h = h0 + kh;
      if (h < 0 || h >= H) continue;
      for (int kw = 0; kw < g.k[2]; ++kw) {
        const index_t w = w0 + kw;
        if (w < 0 || w >= W) continue;
        const scalar_t* yp = y + (d * ys0 + h * ys1 + w * ys2);
        const int k = (kd * g.k[1] + kh) * g.k[2] + kw;
        const Run<scalar_t, V> yr = load_run<V>(yp);  // V > 1: cs == 1 (see Run)
M3D_UNROLL
        for (int j = 0; j < V; ++j) {
          const acc_t z = bn_pre_act<acc_t>(static_cast<acc_t>(yr.v[j]), mean[j], scale[j],
                                            bias[j], acc_t(0));
          // max_pool3d's rule: the first in-window position starts it; a larger value or a
          // NaN replaces it (z != z is the NaN test, valid on host and device).
          if (first || z > best[j] || z != z) {
            best[j] = z;
            arg[j] = static_cast<uint8_t>(k);
          }
        }
        first = false;
      }
    }
  }
}

// The pooled windows along axis `a` that contain input position `pos`: window j covers
// [j*s - p, j*s - p + k - 1], so j in [ceil((pos + p - k + 1) / s), floor((pos + p) / s)]
// within [0, size); lo > hi when there is none.
template <typename index_t>
M3D_HOST_DEVICE void pool_windows_of(const PoolGeom& g, int a, index_t pos, index_t size,
                                     index_t& lo, index_t& hi) {
  const index_t top = pos + index_t(g.p[a]), low = top - index_t(g.k[a] - 1);
  // ceil(low / s) as (low - 1) / s + 1: low + s - 1 overflowed int32 for strides near
  // INT32_MAX (lo went negative and the loop read before the tensor)
  // (both divisions have non-negative operands: unsigned, several instructions fewer on a GPU)
  using u_t = std::make_unsigned_t<index_t>;
  lo = low <= 0 ? index_t(0) : index_t(u_t(low - 1) / u_t(index_t(g.s[a]))) + 1;
  const index_t q = index_t(u_t(top) / u_t(index_t(g.s[a])));
  hi = q < size - 1 ? q : size - 1;
}

// Per channel, the sum of grad_out over the windows whose argmax is input position (d, h, w);
// gout and arg point at (n, first channel) of the pooled tensors (pool_windows_of per axis).
template <int V, typename scalar_t, typename acc_t, typename index_t>
M3D_HOST_DEVICE void pool_grad_at(const scalar_t* gout, const uint8_t* arg, int64_t cs,
                                  const PoolGeom& g, index_t d, index_t h, index_t w, acc_t* sum) {
  const index_t pos[3] = {d, h, w}, size[3] = {index_t(g.OD), index_t(g.OH), index_t(g.OW)};
  const index_t s[3] = {index_t(g.s[0]), index_t(g.s[1]), index_t(g.s[2])};
  const index_t p[3] = {index_t(g.p[0]), index_t(g.p[1]), index_t(g.p[2])};
  index_t lo[3], hi[3];
M3D_UNROLL
  for (int a = 0; a < 3; ++a) pool_windows_of<index_t>(g, a, pos[a], size[a], lo[a], hi[a]);
  const index_t os0 = index_t(g.os[0]), os1 = index_t(g.os[1]), os2 = index_t(g.os[2]);
M3D_UNROLL
  for (int j = 0; j < V; ++j) sum[j] = acc_t(0);
  for (index_t od = lo[0]; od <= hi[0]; ++od)
    for (index_t oh = lo[1]; oh <= hi[1]; ++oh)
      for (index_t ow = lo[2]; ow <= hi[2]; ++ow) {
        const int k = int(((d - (od * s[0] - p[0])) * g.k[1] + (h - (oh * s[1] - p[1]))) * g.k[2] +
                          (w - (ow * s[2] - p[2])));
        const index_t o = od * os0 + oh * os1 + ow * os2;
        // V > 1: cs == 1 (see Run); both runs are loaded whole, the sum takes the matches
        const Run<uint8_t, V> ar = load_run<V>(arg + o);
        const Run<scalar_t, V> gr = load_run<V>(gout + o);
M3D_UNROLL
        for (int j = 0; j < V; ++j)
          if (ar.v[j] == k) sum[j] += static_cast<acc_t>(gr.v[j]);
      }
}

// Whether index_t = int32_t serves the window math above for tensors of these element counts
// (y's and the pooled tensor's): every coordinate and offset is below the larger count, and the
// intermediate sums (position + padding, window starts) stay within a kernel size of the range.
inline bool pool_index_fits_int32(int64_t y_numel, int64_t out_numel) {
  return fits_int32(std::max(y_numel, out_numel) + 2 * kMaxPoolWindow);
}

// Geometry of the pool from y (the conv output) and the pooled tensor's sizes/strides.
PoolGeom make_pool_geom(const at::Tensor& y, at::IntArrayRef out_spatial,
                        at::IntArrayRef out_strides, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding);

// Pooled output sizes (N, C, OD, OH, OW) with argument checks.
std::vector<int64_t> pool_out_sizes(const char* op, const at::Tensor& y, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef padding);

// Per-device kernels. Forward: out (pooled, y's layout) and argmax (uint8, same layout).
// Backward: (grad_y, grad_bn_weight, grad_bn_bias); per-channel tensors in the acc dtype.
using PoolApplyFn = void (*)(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                             const at::Tensor& w, const at::Tensor& b, const PoolGeom& g,
                             at::Tensor& out, at::Tensor& argmax);
void bn_relu_pool_forward_cpu(const at::Tensor& y, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& b,
                              const PoolGeom& g, at::Tensor& out, at::Tensor& argmax);

using PoolBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& argmax,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& b,
    const PoolGeom& g, bool training);

// Device-independent op bodies (checks, conv, statistics, layouts), parameterised by the kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool3d_generic(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool training, double eps,
                               at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                               at::IntArrayRef pool_padding, int64_t conv_algo, PoolApplyFn apply,
                               StatsFn stats);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_backward_generic(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& argmax,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, bool training, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, PoolBackwardFn backward);

}  // namespace med3d_ext
