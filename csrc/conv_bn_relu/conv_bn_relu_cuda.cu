// CUDA entry points of conv_bn_relu3d / bn_relu_backward / conv_bias_relu3d (see
// conv_bn_relu.h). The convolutions are ATen's (cuDNN); this file launches the epilogue kernels
// of conv_bn_relu_kernels.cuh around them: one pass for the forward epilogue, and for the
// backward one reduction pass, a tiny per-channel finishing launch and one apply pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "conv_bn_relu_launch.cuh"

namespace med3d_ext {
namespace {

using namespace cbr;

// True when t is dense with y's memory order: the kernels read/write it with y's flat index
// (strides of size-1 dimensions do not matter).
bool same_dense_layout(const at::Tensor& t, const at::Tensor& y) {
  if (t.sizes() != y.sizes()) return false;
  if (t.numel() == 0) return true;  // nothing is read or written
  if (!t.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < y.dim(); ++d)
    if (y.size(d) != 1 && t.stride(d) != y.stride(d)) return false;
  return true;
}

// t (y's shape) in y's dtype and exact memory layout: a no-op when it already is, else a copy.
// Every element-wise kernel here indexes all its tensors with one flat index, so a residual,
// grad_out or output in any other layout (a different memory format, a strided view, ...)
// would be read or written at the wrong elements.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& y) {
  at::Tensor u = t.scalar_type() == y.scalar_type() ? t : t.to(y.scalar_type());
  if (same_dense_layout(u, y)) return u;
  u = u.contiguous(layout_of(y));
  M3D_CHECK(same_dense_layout(u, y), "med3d_ext.conv_bn_relu3d (CUDA): internal error: "
              "cannot bring a tensor of strides ", t.strides(), " to y's layout ", y.strides());
  return u;
}

void bn_act_forward_cuda(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& w, const at::Tensor& b, const at::Tensor* r_in,
                         bool relu, at::Tensor& out_in) {
  const Geometry g = geometry(y);
  // The residual and the output must share y's layout (the caller makes them so; this keeps
  // the kernel correct whatever it is handed).
  at::Tensor r_local;
  if (r_in) r_local = in_layout_of(*r_in, y);
  const at::Tensor* r = r_in ? &r_local : nullptr;
  const bool out_ok = out_in.scalar_type() == y.scalar_type() && same_dense_layout(out_in, y);
  at::Tensor out = out_ok ? out_in : at::empty_like(y, y.options(), layout_of(y));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // undefined per-channel tensors (mean 0, invstd 1, weight 1, bias 0) go in as null
    auto opt = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    const ParamPtrs<acc_t> pp{opt(mean), opt(invstd), opt(w), opt(b), nullptr};
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* rp = r ? r->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vec = can_vectorise<scalar_t>(g, {yp, rp, op});
    M3D_BOOL_SWITCH(relu, kRelu, [&] {
      M3D_BOOL_SWITCH(rp != nullptr, kRes, [&] {
        const ForwardOp<scalar_t, acc_t, kRelu, kRes> f{yp, rp, op};
        if (vec) launch_elementwise<acc_t, vec_width<scalar_t>()>(g, f, pp, stream);
        else launch_elementwise<acc_t, 1>(g, f, pp, stream);
      });
    });
  });
  if (!out_ok) out_in.copy_(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& relu_out, bool training, bool relu) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  auto [grad_out_p, r_p] =
      prepare_bn_relu_backward(grad_out_in, y_in, mean_in, invstd_in, bn_weight, bn_bias, relu_out);
  const at::Tensor y = y_in.contiguous(layout_of(y_in));
  const Geometry g = geometry(y);
  const auto fmt = layout_of(y);
  // grad_out and the residual in y's exact layout (prepare_bn_relu_backward already brings
  // them there; checked again because the kernels index all of them with y's flat index).
  const at::Tensor grad_out = in_layout_of(grad_out_p, y);
  const at::Tensor r = r_p.defined() ? in_layout_of(r_p, y) : r_p;
  auto mean = acc_param(mean_in, y), invstd = acc_param(invstd_in, y);
  auto w = acc_param(bn_weight, y), b = acc_param(bn_bias, y);
  at::Tensor grad_y = at::empty_like(y, y.options(), fmt);
  at::Tensor grad_r = r.defined() ? at::empty_like(y, y.options(), fmt) : at::empty({0}, y.options());
  if (y.numel() == 0) {
    auto z = at::zeros({g.C}, mean.options());
    return {grad_y, z, z.clone(), grad_r};
  }
  // fully written by reduce_finish
  auto grad_w = at::empty({g.C}, mean.options()), grad_b = at::empty({g.C}, mean.options());
  auto coef = at::empty({g.C * 3}, mean.options());
  at::Tensor partial = at::empty({0}, mean.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_relu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ParamPtrs<acc_t> pp{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), nullptr};
    const scalar_t *dp = grad_out.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* grp = r.defined() ? grad_r.data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const bool vec = can_vectorise<scalar_t>(g, {dp, yp, rp, grp, gyp});
    M3D_BOOL_SWITCH(relu, kRelu, [&] {
      M3D_BOOL_SWITCH(rp != nullptr, kRes, [&] {
        auto run = [&](auto vtag) {
          constexpr int V = decltype(vtag)::value;
          const BackwardAcc<scalar_t, acc_t, kRelu, kRes> acc{dp, yp, rp, grp};
          const int64_t splits = launch_reduce<acc_t, V>(g, acc, pp, partial, stream);
          reduce_finish<acc_t><<<finish_blocks(g.C), kFinishWarps * 32, 0, stream>>>(
              partial.const_data_ptr<acc_t>(), splits, g.C, acc_t(g.M), training, pp,
              grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          pp.coef = coef.const_data_ptr<acc_t>();
          const BackwardApplyOp<scalar_t, acc_t, kRelu, kRes> f{dp, yp, grp, gyp};
          launch_elementwise<acc_t, V>(g, f, pp, stream);
        };
        if (vec) run(std::integral_constant<int, vec_width<scalar_t>()>{});
        else run(std::integral_constant<int, 1>{});
      });
    });
  });
  return {grad_y, grad_w, grad_b, grad_r};
}

}  // namespace

// Training statistics in one pass over y: shifted sums (the shift K_c = y[0, c, 0, 0, 0] keeps
// the variance exact when |mean| >> std), then one finishing launch that writes mean, invstd
// and the unbiased variance. MED3D_EXT_GENERIC_STATS=1 switches to bn_stats + ATen instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_stats_cuda(const at::Tensor& y,
                                                                     double eps) {
  using namespace cbr;
  const Geometry g = geometry(y);
  auto opts = y.options().dtype(acc_dtype(y));
  auto mean = at::empty({g.C}, opts), invstd = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  at::Tensor partial = at::empty({0}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_fwd_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamPtrs<acc_t> pp{nullptr, nullptr, nullptr, nullptr, nullptr};  // StatsAcc::params
    const StatsAcc<scalar_t, acc_t> acc{y.const_data_ptr<scalar_t>(), y.stride(1)};
    const int64_t splits =
        can_vectorise<scalar_t>(g, {acc.y})
            ? launch_reduce<acc_t, vec_width<scalar_t>()>(g, acc, pp, partial, stream)
            : launch_reduce<acc_t, 1>(g, acc, pp, partial, stream);
    stats_finish<scalar_t, acc_t><<<finish_blocks(g.C), kFinishWarps * 32, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), splits, g.C, acc_t(g.M), acc.y, acc.c_stride, eps,
        mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, invstd, var};
}

bool generic_stats() {
  const char* v = std::getenv("MED3D_EXT_GENERIC_STATS");
  return v && *v && std::string(v) != "0";
}

namespace {

ConvBnReluOut conv_bn_relu3d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                  const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var,
                                  const c10::optional<at::Tensor>& residual,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, bool training, double eps, bool relu,
                                  int64_t conv_algo) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv_bn_relu3d_generic(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                stride, padding, dilation, training, eps, relu, conv_algo,
                                &bn_act_forward_cuda,
                                generic_stats() ? nullptr : &bn_forward_stats_cuda);
}

at::Tensor bn_act_cuda(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& bn_weight, const at::Tensor& bn_bias, bool relu) {
  const c10::cuda::CUDAGuard guard(y.device());
  return bn_act_generic(y, mean, invstd, bn_weight, bn_bias, relu, &bn_act_forward_cuda);
}

at::Tensor conv_bias_relu3d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                                 int64_t conv_algo) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv_bias_relu3d_generic(x, weight, bias, residual, stride, padding, dilation, relu,
                                  conv_algo, &bn_act_forward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) {
  m.impl("conv_bn_relu3d", &conv_bn_relu3d_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
  m.impl("bn_act", &bn_act_cuda);
  m.impl("conv_bias_relu3d", &conv_bias_relu3d_cuda);
}

}  // namespace med3d_ext
