// Autograd of conv_bn_relu3d, conv_bias_relu3d and conv_bn_relu_maxpool3d, registered in C++ for both devices (see
// conv_bn_relu.h for the math).
//
// Why C++ and not torch.library.register_autograd from Python: a fused ResNet calls these ops
// ~50 times per step (ResNet-50), and the GPU step the issue aims for (<= 17 ms) leaves ~0.3 ms
// of host time per layer for forward + backward. The Python route (the registered Python
// autograd kernel, setup_context, a Python backward, materialised zero gradients for the four
// non-differentiable outputs) cost ~120 of ~330 us per layer forward + backward on the CPU; here
// the node and the backward are plain C++, and the backward is two op calls: bn_relu_backward
// and the convolution's backward (ATen's, or the stem's GEMM: conv3d.cpp). torch.compile traces it like any C++ autograd (AOTAutograd
// runs it on fake tensors; both ops have fake kernels).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>

#include "conv_bn_relu.h"

namespace med3d_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using CbrSig = ConvBnReluOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const c10::optional<at::Tensor>&,
                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                             at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, double,
                             bool, int64_t);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const c10::optional<at::Tensor>&, bool, bool);
using CbSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                         const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, bool, int64_t);

using PoolSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, bool, double, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t);
using PoolBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, bool, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
const c10::TypedOperatorHandle<CbrSig>& cbr_op() {
  static const auto op = find_op<CbrSig>("med3d_ext::conv_bn_relu3d");
  return op;
}
const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = find_op<BwdSig>("med3d_ext::bn_relu_backward");
  return op;
}
const c10::TypedOperatorHandle<CbSig>& cb_op() {
  static const auto op = find_op<CbSig>("med3d_ext::conv_bias_relu3d");
  return op;
}

const c10::TypedOperatorHandle<PoolSig>& pool_op() {
  static const auto op = find_op<PoolSig>("med3d_ext::conv_bn_relu_maxpool3d");
  return op;
}
const c10::TypedOperatorHandle<PoolBwdSig>& pool_bwd_op() {
  static const auto op = find_op<PoolBwdSig>("med3d_ext::bn_relu_maxpool_backward");
  return op;
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

bool wants_grad(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// The weight the convolution runs with. Under autocast the Python wrapper passes an fp32
// weight with a bf16/fp16 input (ops/conv_bn_relu.py, _cast_weight): it is cast before the op
// runs (autocast_weight, conv_bn_relu.h; here for the op's fake kernel, and again in the device
// op body for calls that skip this autograd kernel), and the fp32 parameter -- alive anyway --
// is what backward keeps and casts again, so no cast copy of every layer's weight waits for
// backward (88 MiB in a bf16 ResNet-50 step). Backward casts whatever forward did.
at::Tensor saved_weight_for(const at::Tensor& weight, const at::Tensor& x) {
  if (weight.scalar_type() == at::kFloat &&
      (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf))
    return weight.to(x.scalar_type());
  return weight;
}

void save_conv_args(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t conv_algo) {
  ctx->saved_data["stride"] = vec(stride);
  ctx->saved_data["padding"] = vec(padding);
  ctx->saved_data["dilation"] = vec(dilation);
  ctx->saved_data["conv_algo"] = conv_algo;
}

// grad_x, grad_weight of y = conv3d(x, weight) (the save_conv_args arguments from ctx).
std::pair<at::Tensor, at::Tensor> conv_grads(AutogradContext* ctx, const at::Tensor& grad_y,
                                             const at::Tensor& x, const at::Tensor& weight,
                                             bool need_x, bool need_w) {
  if (!(need_x || need_w)) return {};
  const auto stride = ctx->saved_data["stride"].toIntVector(),
             padding = ctx->saved_data["padding"].toIntVector(),
             dilation = ctx->saved_data["dilation"].toIntVector();
  return conv3d_backward(grad_y, x, weight,
                         ConvArgs{stride, padding, dilation, ctx->saved_data["conv_algo"].toInt()},
                         need_x, need_w);
}

// An argument's edge index: edges exist only for tensor arguments that are present (an absent
// optional tensor has none), in argument order.
int64_t edge_of(const std::vector<bool>& present, size_t arg) {
  int64_t e = 0;
  for (size_t i = 0; i < arg; ++i) e += present[i];
  return e;
}

// ---- conv_bn_relu3d --------------------------------------------------------------------------

class ConvBnReluFunction : public torch::autograd::Function<ConvBnReluFunction> {
 public:
  // Arguments (14): x, weight, bn_weight, bn_bias, running_mean?, running_var?, residual?,
  // stride, padding, dilation, training, eps, relu, conv_algo.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool training,
                               double eps, bool relu, int64_t conv_algo) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, y, mean, invstd, var] =
        cbr_op().call(x, autocast_weight(weight, x), bn_weight, bn_bias, running_mean,
                      running_var, residual, stride, padding, dilation, training, eps, relu,
                      conv_algo);
    // With a residual and a ReLU the output is kept, not the residual: its sign is the ReLU
    // mask, and it is the block's output, which the next block keeps anyway (the residual, e.g.
    // a downsample branch's BatchNorm output, would be kept for this alone). Without a ReLU
    // nothing is needed: grad_residual is grad_out.
    ctx->save_for_backward({x, weight, y, mean, invstd, bn_weight, bn_bias,
                            residual.has_value() && relu ? out : at::Tensor()});
    save_conv_args(ctx, stride, padding, dilation, conv_algo);
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    const std::vector<bool> present{true, true, true, true, running_mean.has_value(),
                                    running_var.has_value(), residual.has_value()};
    ctx->saved_data["residual_edge"] = edge_of(present, 6);
    ctx->saved_data["has_residual"] = residual.has_value();
    if (residual.has_value()) ctx->saved_data["residual_dtype"] = residual->scalar_type();
    ctx->mark_non_differentiable({y, mean, invstd, var});
    ctx->set_materialize_grads(false);  // y, mean, invstd, var never get gradient tensors
    return {out, y, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(14);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    // bn_relu_backward has no derivative of its own: refuse create_graph rather than return a
    // gradient that silently does not track its inputs.
    TORCH_CHECK(!at::GradMode::is_enabled(), "med3d_ext.conv_bn_relu3d: double backward "
                "(create_graph=True) is not supported; use the unfused model (fused=False)");
    const variable_list sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &weight = sv[1], &y = sv[2], &bn_weight = sv[5],
                     &bn_bias = sv[6], &relu_out = sv[7];  // with a residual and a ReLU only
    const bool need_res = ctx->saved_data["has_residual"].toBool() &&
                          ctx->needs_input_grad(ctx->saved_data["residual_edge"].toInt());
    at::Tensor grad_y, gbw, gbb, gr;
    {
      // Straight to the device kernel (it has no autograd of its own).
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(grad_y, gbw, gbb, gr) =
          bwd_op().call(grad_out, y, sv[3], sv[4], bn_weight, bn_bias, opt(relu_out),
                        ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool());
    }
    std::tie(grads[0], grads[1]) =
        conv_grads(ctx, grad_y, x, saved_weight_for(weight, x), ctx->needs_input_grad(0),
                   ctx->needs_input_grad(1));
    // computed in x's dtype, as autocast's conv3d does; returned in the weight's own dtype
    if (grads[1].defined()) grads[1] = grads[1].to(weight.scalar_type());
    if (ctx->needs_input_grad(2)) grads[2] = gbw.to(bn_weight.scalar_type());
    if (ctx->needs_input_grad(3)) grads[3] = gbb.to(bn_bias.scalar_type());
    if (need_res) {
      const auto dtype = ctx->saved_data["residual_dtype"].toScalarType();
      grads[6] = relu_out.defined() ? gr.to(dtype) : grad_out.to(dtype);  // no ReLU: identity
    }
    return grads;
  }
};

ConvBnReluOut conv_bn_relu3d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                      const c10::optional<at::Tensor>& running_mean,
                                      const c10::optional<at::Tensor>& running_var,
                                      const c10::optional<at::Tensor>& residual,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, bool training, double eps,
                                      bool relu, int64_t conv_algo) {
  // Evaluation / no_grad calls skip the node machinery altogether.
  if (!wants_grad({&x, &weight, &bn_weight, &bn_bias, residual ? &*residual : nullptr})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return cbr_op().call(x, autocast_weight(weight, x), bn_weight, bn_bias, running_mean,
                         running_var, residual, stride, padding, dilation, training, eps, relu,
                         conv_algo);
  }
  variable_list o = ConvBnReluFunction::apply(x, weight, bn_weight, bn_bias, running_mean,
                                              running_var, residual, stride, padding, dilation,
                                              training, eps, relu, conv_algo);
  return {o[0], o[1], o[2], o[3], o[4]};
}

// ---- conv_bias_relu3d ------------------------------------------------------------------------

class ConvBiasReluFunction : public torch::autograd::Function<ConvBiasReluFunction> {
 public:
  // Arguments (9): x, weight, bias?, residual?, stride, padding, dilation, relu, conv_algo.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                               int64_t conv_algo) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out =
        cb_op().call(x, weight, bias, residual, stride, padding, dilation, relu, conv_algo);
    // The ReLU mask is read back from the output (out <= 0), so no extra tensor is kept.
    ctx->save_for_backward({x, weight, relu ? out : at::Tensor(),
                            bias.has_value() ? *bias : at::Tensor()});
    save_conv_args(ctx, stride, padding, dilation, conv_algo);
    const std::vector<bool> present{true, true, bias.has_value(), residual.has_value()};
    ctx->saved_data["bias_edge"] = bias.has_value() ? edge_of(present, 2) : int64_t(-1);
    ctx->saved_data["residual_edge"] = residual.has_value() ? edge_of(present, 3) : int64_t(-1);
    ctx->set_materialize_grads(false);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(9);
    if (!grad_outputs[0].defined()) return grads;
    const variable_list sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &weight = sv[1], &out = sv[2], &bias = sv[3];
    at::Tensor g = grad_outputs[0].to(x.scalar_type());
    // threshold_backward's rule: zero where out <= 0 (a NaN output passes its gradient)
    if (out.defined()) g = at::where(out <= 0, at::zeros({}, g.options()), g);
    std::tie(grads[0], grads[1]) =
        conv_grads(ctx, g, x, weight, ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    const int64_t be = ctx->saved_data["bias_edge"].toInt();
    if (be >= 0 && ctx->needs_input_grad(be)) {
      const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      grads[2] = g.sum({0, 2, 3, 4}, false, acc).to(bias.scalar_type());
    }
    const int64_t re = ctx->saved_data["residual_edge"].toInt();
    if (re >= 0 && ctx->needs_input_grad(re)) grads[3] = g;
    return grads;
  }
};

at::Tensor conv_bias_relu3d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool relu, int64_t conv_algo) {
  if (!wants_grad({&x, &weight, bias ? &*bias : nullptr, residual ? &*residual : nullptr})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return cb_op().call(x, weight, bias, residual, stride, padding, dilation, relu, conv_algo);
  }
  return ConvBiasReluFunction::apply(x, weight, bias, residual, stride, padding, dilation, relu,
                                     conv_algo)[0];
}

// ---- conv_bn_relu_maxpool3d (the stem) -------------------------------------------------------

using PoolOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

class ConvBnReluPoolFunction : public torch::autograd::Function<ConvBnReluPoolFunction> {
 public:
  // Arguments (15): x, weight, bn_weight, bn_bias, running_mean?, running_var?, stride, padding,
  // dilation, training, eps, pool_kernel, pool_stride, pool_padding, conv_algo.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool training, double eps,
                               at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                               at::IntArrayRef pool_padding, int64_t conv_algo) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, y, mean, invstd, var, argmax] =
        pool_op().call(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                       dilation, training, eps, pool_kernel, pool_stride, pool_padding,
                       conv_algo);
    ctx->save_for_backward({x, weight, y, argmax, mean, invstd, bn_weight, bn_bias});
    save_conv_args(ctx, stride, padding, dilation, conv_algo);
    ctx->saved_data["training"] = training;
    ctx->saved_data["pool_kernel"] = vec(pool_kernel);
    ctx->saved_data["pool_stride"] = vec(pool_stride);
    ctx->saved_data["pool_padding"] = vec(pool_padding);
    ctx->mark_non_differentiable({y, mean, invstd, var, argmax});
    ctx->set_materialize_grads(false);
    return {out, y, mean, invstd, var, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(15);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    TORCH_CHECK(!at::GradMode::is_enabled(), "med3d_ext.conv_bn_relu_maxpool3d: double backward "
                "(create_graph=True) is not supported; use the unfused model (fused=False)");
    const variable_list sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &weight = sv[1], &bn_weight = sv[6], &bn_bias = sv[7];
    at::Tensor grad_y, gbw, gbb;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(grad_y, gbw, gbb) = pool_bwd_op().call(
          grad_out, sv[2], sv[3], sv[4], sv[5], bn_weight, bn_bias,
          ctx->saved_data["training"].toBool(), ctx->saved_data["pool_kernel"].toIntVector(),
          ctx->saved_data["pool_stride"].toIntVector(),
          ctx->saved_data["pool_padding"].toIntVector());
    }
    std::tie(grads[0], grads[1]) =
        conv_grads(ctx, grad_y, x, weight, ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    if (ctx->needs_input_grad(2)) grads[2] = gbw.to(bn_weight.scalar_type());
    if (ctx->needs_input_grad(3)) grads[3] = gbb.to(bn_bias.scalar_type());
    return grads;
  }
};

PoolOut conv_bn_relu_maxpool3d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                        const c10::optional<at::Tensor>& running_mean,
                                        const c10::optional<at::Tensor>& running_var,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, bool training, double eps,
                                        at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                                        at::IntArrayRef pool_padding, int64_t conv_algo) {
  if (!wants_grad({&x, &weight, &bn_weight, &bn_bias})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return pool_op().call(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                          padding, dilation, training, eps, pool_kernel, pool_stride,
                          pool_padding, conv_algo);
  }
  variable_list o = ConvBnReluPoolFunction::apply(x, weight, bn_weight, bn_bias, running_mean,
                                                  running_var, stride, padding, dilation,
                                                  training, eps, pool_kernel, pool_stride,
                                                  pool_padding, conv_algo);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, Autograd, m) {
  m.impl("conv_bn_relu3d", &conv_bn_relu3d_autograd);
  m.impl("conv_bias_relu3d", &conv_bias_relu3d_autograd);
  m.impl("conv_bn_relu_maxpool3d", &conv_bn_relu_maxpool3d_autograd);
}

}  // namespace med3d_ext
