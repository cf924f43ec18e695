// CUDA kernels of conv_bn_relu_maxpool3d / bn_relu_maxpool_backward (see bn_relu_pool.h).
//
// The window math is bn_relu_pool.h's (shared with the CPU); the drivers are conv_bn_relu's
// element-wise and per-channel reduction kernels (conv_bn_relu_kernels.cuh), fed with functors
// that decode a flat index into (n, c, d, h, w):
//   forward   one pass over the pooled output: window max of z, out = relu(max), uint8 argmax;
//   backward  one gather pass over y (g = the masked gradient from the windows, written into
//             grad_y), then BatchNorm's reduction (sums of g and g * (y - mean)), finishing and
//             apply passes on it, the apply in place. (A first version gathered inside the
//             reduction and again in the apply, one row per thread: 1.3 + 0.7 ms on an H200 for
//             the ResNet stem, slower than conv_bn_relu3d + F.max_pool3d.)
// In channels_last_3d (the GPU fast path) a thread handles V = 16 bytes of adjacent channels of
// one spatial position, so the index decode (32-bit divisions when the tensors allow) and the
// window bounds are computed once per V channels; contiguous tensors take V = 1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bn_relu_pool.h"
#include "conv_bn_relu_launch.cuh"
#include "pool_tiles.cuh"

namespace med3d_ext {
namespace {

using namespace cbr;

// Flat index -> coordinates of a dense 5-D tensor in either layout (sizes N?, C, A, B, E), by
// multiply-and-shift division (ATen's IntDivider; plain unsigned division for int64 indices):
// the four runtime divisions were the largest part of the pool kernels' instructions (SASS,
// sm_90, nvcc 13.0, the bf16 channels_last int32 kernels' loop bodies: forward 455 -> 265,
// backward gather 969 -> 773, with pool_grad_at's unsigned divisions; not yet run on a GPU).
// The 32-bit divider needs dividends <= INT32_MAX, which pool_index_fits_int32 guarantees.
template <typename index_t>
struct Decoder {
  using u_t = std::make_unsigned_t<index_t>;
  using div_t = at::cuda::detail::IntDivider<u_t>;
  div_t C, A, B, E;  // channels and the three spatial sizes
  bool cl;
  __device__ __forceinline__ void operator()(int64_t flat, index_t& n, index_t& c, index_t& a,
                                             index_t& b, index_t& e) const {
    const u_t i = static_cast<u_t>(flat);
    if (cl) {
      const auto q0 = C.divmod(i), q1 = E.divmod(q0.div), q2 = B.divmod(q1.div),
                 q3 = A.divmod(q2.div);
      c = index_t(q0.mod);
      e = index_t(q1.mod);
      b = index_t(q2.mod);
      a = index_t(q3.mod);
      n = index_t(q3.div);
    } else {
      const auto q0 = E.divmod(i), q1 = B.divmod(q0.div), q2 = A.divmod(q1.div),
                 q3 = C.divmod(q2.div);
      e = index_t(q0.mod);
      b = index_t(q1.mod);
      a = index_t(q2.mod);
      c = index_t(q3.mod);
      n = index_t(q3.div);
    }
  }
};

template <int V, typename acc_t>
__device__ __forceinline__ void channel_params(const ChanParams<acc_t>* p, int ps, acc_t* m,
                                               acc_t* sc, acc_t* b) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    m[j] = p[j * ps].m;
    sc[j] = p[j * ps].sc;
    b[j] = p[j * ps].b;
  }
}

// Forward over the pooled output: flat index i of out (and argmax, same layout).
template <typename scalar_t, typename acc_t, typename index_t>
struct PoolForwardOp {
  const scalar_t* y;
  scalar_t* out;
  uint8_t* arg;
  PoolGeom g;
  Decoder<index_t> dec;  // over out's sizes
  int64_t ysn, ysc;      // y's batch and channel strides
  template <int V, int PS>
  __device__ __forceinline__ void operator()(int64_t i, const ChanParams<acc_t>* p) const {
    index_t n, c, od, oh, ow;
    dec(i, n, c, od, oh, ow);
    acc_t m[V], sc[V], b[V], best[V];
    uint8_t a[V];
    channel_params<V>(p, PS, m, sc, b);
    pool_window_max<V, scalar_t, acc_t, index_t>(y + n * ysn + c * ysc, ysc, g, od, oh, ow, m, sc,
                                                 b, best, a);
    Run<scalar_t, V> ov;
    Run<uint8_t, V> ar;
#pragma unroll
    for (int j = 0; j < V; ++j) {  // V > 1 only in channels_last_3d, where channels are adjacent
      ov.v[j] = static_cast<scalar_t>(bn_act<true>(best[j]));
      ar.v[j] = a[j];
    }
    store_run<V>(out + i, ov);
    store_run<V>(arg + i, ar);
  }
};

// Backward: the masked gradient of V channels at flat index i of y, gathered from the windows.
template <typename scalar_t, typename acc_t, typename index_t>
struct PoolGrad {
  const scalar_t* y;
  const scalar_t* gout;
  const uint8_t* arg;
  PoolGeom g;
  Decoder<index_t> dec;  // over y's sizes
  int64_t osn, osc;      // the pooled tensors' batch and channel strides
  template <int V, int PS>
  __device__ __forceinline__ void at(int64_t i, const ChanParams<acc_t>* p, acc_t* yv,
                                     acc_t* gv) const {
    index_t n, c, d, h, w;
    dec(i, n, c, d, h, w);
    const int64_t o = n * osn + c * osc;
    pool_grad_at<V, scalar_t, acc_t, index_t>(gout + o, arg + o, osc, g, d, h, w, gv);
    const Run<scalar_t, V> yr = load_run<V>(y + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const auto& q = p[j * PS];
      yv[j] = static_cast<acc_t>(yr.v[j]);
      gv[j] = bn_masked_grad<true>(gv[j], bn_pre_act<acc_t>(yv[j], q.m, q.sc, q.b, acc_t(0)));
    }
  }
};

// The gather pass of the backward: g = the masked gradient gathered from the windows, written
// (rounded to y's dtype, as the unfused max_pool3d backward hands it to BatchNorm's) where the
// reduction and the apply pass then read it like any other gradient.
template <typename scalar_t, typename acc_t, typename index_t>
struct PoolGatherOp {
  PoolGrad<scalar_t, acc_t, index_t> pg;
  scalar_t* g;
  template <int V, int PS>
  __device__ __forceinline__ void operator()(int64_t i, const ChanParams<acc_t>* p) const {
    acc_t yv[V], gv[V];
    pg.template at<V, PS>(i, p, yv, gv);
    Run<scalar_t, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = static_cast<scalar_t>(gv[j]);
    store_run<V>(g + i, r);
  }
};

template <typename index_t>
Decoder<index_t> decoder(const at::Tensor& t) {
  // (a zero size, whose tensor has nothing to decode, as 1: a divider by 0 divides by 0 on the host)
  using u_t = std::make_unsigned_t<index_t>;
  auto size = [&](int d) { return u_t(std::max<int64_t>(t.size(d), 1)); };
  return {size(1), size(2), size(3), size(4), is_channels_last_3d(t)};
}

// V = 16 bytes of channels in channels_last_3d when C and the pointers allow, else 1; then the
// index type: 32-bit when every flat index of y and of the pooled tensors, and the window math
// on them, fit (pool_index_fits_int32).
template <typename scalar_t, typename F>
void dispatch_shape(const Geometry& g, int64_t y_numel, int64_t out_numel,
                    std::initializer_list<const void*> ptrs, const F& f) {
  const bool vec = g.cl && can_vectorise<scalar_t>(g, ptrs);
  M3D_INDEX_SWITCH(pool_index_fits_int32(y_numel, out_numel), index_t, [&] {
    if (vec) f(std::integral_constant<int, vec_width<scalar_t>()>{}, index_t(0));
    else f(std::integral_constant<int, 1>{}, index_t(0));
  });
}

void bn_relu_pool_forward_cuda(const at::Tensor& y, const at::Tensor& mean,
                               const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& b,
                               const PoolGeom& g, at::Tensor& out, at::Tensor& argmax) {
  const Geometry go = geometry(out);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_pool_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamPtrs<acc_t> pp{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                              w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), nullptr};
    // The decoded flat index is out's, which can exceed y's (kernel 2, padding 1, stride 1).
    dispatch_shape<scalar_t>(go, y.numel(), out.numel(),
                             {y.const_data_ptr(), out.const_data_ptr(), argmax.const_data_ptr()},
                             [&](auto vtag, auto itag) {
      constexpr int V = decltype(vtag)::value;
      using index_t = decltype(itag);
      if (pool_tiles::launch_forward<scalar_t, acc_t, V>(y, out, argmax, pp, g, stream)) return;
      const PoolForwardOp<scalar_t, acc_t, index_t> f{
          y.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), argmax.data_ptr<uint8_t>(), g,
          decoder<index_t>(out), y.stride(0), y.stride(1)};
      launch_elementwise<acc_t, V>(go, f, pp, stream);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& argmax,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& b,
    const PoolGeom& g, bool training) {
  const Geometry gy = geometry(y);
  at::Tensor grad_y = at::empty_like(y, y.options(), layout_of(y));
  // fully written by reduce_finish
  auto grad_w = at::empty({gy.C}, mean.options()), grad_b = at::empty({gy.C}, mean.options());
  auto coef = at::empty({gy.C * 3}, mean.options());
  at::Tensor partial = at::empty({0}, mean.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_pool_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ParamPtrs<acc_t> pp{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), nullptr};
    // The gather's offsets are grad_out's and argmax's, which can exceed y's (as above).
    // every tensor read or written a channel group at a time (Run) must be 16-byte aligned
    dispatch_shape<scalar_t>(gy, y.numel(), grad_out.numel(),
                             {y.const_data_ptr(), grad_y.const_data_ptr(),
                              grad_out.const_data_ptr(), argmax.const_data_ptr()},
                             [&](auto vtag, auto itag) {
      constexpr int V = decltype(vtag)::value;
      using index_t = decltype(itag);
      const PoolGrad<scalar_t, acc_t, index_t> pg{
          y.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
          argmax.const_data_ptr<uint8_t>(), g, decoder<index_t>(y), grad_out.stride(0),
          grad_out.stride(1)};
      scalar_t* gp = grad_y.data_ptr<scalar_t>();
      // 1. gather: g into grad_y's memory (the gather's index decoding and window walk run once,
      //    not in both of the following passes); by tiles when asked (pool_tiles.cuh), which
      //    can add step 2's sums as well (tiled > 0: its splits)
      const int64_t tiled = pool_tiles::launch_gather<scalar_t, acc_t, V>(
          y, grad_out, argmax, grad_y, pp, g, partial, stream);
      if (tiled < 0)
        launch_elementwise<acc_t, V>(gy, PoolGatherOp<scalar_t, acc_t, index_t>{pg, gp}, pp, stream);
      // 2. the per-channel sums of g and g (y - mean): BatchNorm's own reduction on an
      //    already-masked gradient (no ReLU mask, no residual), with its rows-in-flight loads
      const BackwardAcc<scalar_t, acc_t, false, false> acc{gp, y.const_data_ptr<scalar_t>(),
                                                           nullptr, nullptr};
      const int64_t splits = tiled > 0 ? tiled : launch_reduce<acc_t, V>(gy, acc, pp, partial, stream);
      reduce_finish<acc_t><<<finish_blocks(gy.C), kFinishWarps * 32, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), splits, gy.C, acc_t(gy.M), training, pp,
          grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pp.coef = coef.const_data_ptr<acc_t>();
      // 3. apply, in place: each element's g is read by the thread that overwrites it
      const BackwardApplyOp<scalar_t, acc_t, false, false> f{gp, y.const_data_ptr<scalar_t>(),
                                                             nullptr, gp};
      launch_elementwise<acc_t, V>(gy, f, pp, stream);
    });
  });
  return {grad_y, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool3d_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool training,
                            double eps, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                            at::IntArrayRef pool_padding, int64_t conv_algo) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv_bn_relu_maxpool3d_generic(
      x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
      training, eps, pool_kernel, pool_stride, pool_padding, conv_algo, &bn_relu_pool_forward_cuda,
      generic_stats() ? nullptr : &bn_forward_stats_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& argmax,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, bool training, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding) {
  const c10::cuda::CUDAGuard guard(y.device());
  return bn_relu_maxpool_backward_generic(grad_out, y, argmax, mean, invstd, bn_weight, bn_bias,
                                          training, pool_kernel, pool_stride, pool_padding,
                                          &bn_relu_pool_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) {
  m.impl("conv_bn_relu_maxpool3d", &conv_bn_relu_maxpool3d_cuda);
  m.impl("bn_relu_maxpool_backward", &bn_relu_maxpool_backward_cuda);
}

}  // namespace med3d_ext
