// Device-independent parts of conv_bn_relu3d (see conv_bn_relu.h): entry checks, the
// statistics, and the composite ops, parameterised by the per-device
// elementwise kernel. The CPU ops are registered here; the CUDA ops in conv_bn_relu_cuda.cu.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "conv_bn_relu.h"

namespace med3d_ext {
namespace {

std::string sizes_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

at::ScalarType acc_dtype(const at::Tensor& y) {
  return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-channel parameter in the accumulation dtype, contiguous (a no-op when it already is).
at::Tensor acc_param(const at::Tensor& p, const at::Tensor& like_y) {
  return p.to(like_y.device(), acc_dtype(like_y)).contiguous();
}

std::vector<int64_t> conv3d_out_sizes(const char* op, const at::Tensor& x, const at::Tensor& w,
                                      const ConvArgs& conv) {
  for (auto* a : {&conv.stride, &conv.padding, &conv.dilation})
    M3D_CHECK(a->size() == 3, "med3d_ext.", op, ": stride, padding and dilation need 3 values");
  std::vector<int64_t> out{x.size(0), w.size(0)};
  for (int i = 0; i < 3; ++i) {
    const int64_t s = conv.stride[i], p = conv.padding[i], d = conv.dilation[i];
    M3D_CHECK(s > 0 && d > 0 && p >= 0, "med3d_ext.", op,
                ": stride and dilation must be positive and padding non-negative, got stride=",
                sizes_str(conv.stride), " padding=", sizes_str(conv.padding),
                " dilation=", sizes_str(conv.dilation));
    int64_t span = 0, padded = 0;
    M3D_CHECK(conv_extent(x.size(2 + i), w.size(2 + i), p, d, padded, span), "med3d_ext.", op,
              ": padding or dilation too large (the padded size or the dilated kernel overflows "
              "int64), got padding=", sizes_str(conv.padding), " dilation=",
              sizes_str(conv.dilation), " for kernel ", sizes_str(w.sizes().slice(2)));
    M3D_CHECK(padded >= span, "med3d_ext.", op, ": argument 'x' is too small: spatial size ",
                sizes_str(x.sizes().slice(2)), " padded by ", sizes_str(conv.padding),
                " is smaller than the dilated kernel ", sizes_str(w.sizes().slice(2)),
                " (dilation ", sizes_str(conv.dilation), ")");
    out.push_back((padded - span) / s + 1);
  }
  return out;
}

at::MemoryFormat check_conv_bn_relu_args(const char* op, const at::Tensor& x,
                                         const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& residual,
                                         const ConvArgs& conv) {
  M3D_CHECK_ARG(x.defined() && x.dim() == 5, op, "x", x, "5-D (N, Cin, D, H, W)");
  M3D_CHECK_ARG(weight.defined() && weight.dim() == 5, op, "weight", weight,
                "5-D (Cout, Cin, kD, kH, kW)");
  check_float(op, "x", x);
  check_same_device(op, "weight", weight, x);
  M3D_CHECK_ARG(weight.scalar_type() == x.scalar_type(), op, "weight", weight,
                std::string("of the same dtype as x (") + c10::toString(x.scalar_type()) + ")");
  M3D_CHECK_ARG(weight.size(1) == x.size(1), op, "weight", weight,
                "(Cout, Cin, kD, kH, kW) with Cin = x.size(1) = " + std::to_string(x.size(1)));
  auto out_sizes = conv3d_out_sizes(op, x, weight, conv);
  if (residual.has_value()) {
    const auto& r = *residual;
    check_same_device(op, "residual", r, x);
    M3D_CHECK_ARG(r.sizes() == at::IntArrayRef(out_sizes), op, "residual", r,
                  "of the output's shape " + sizes_str(out_sizes));
    check_float(op, "residual", r);
  }
  return (prefers_channels_last_3d(x) || prefers_channels_last_3d(weight))
             ? at::MemoryFormat::ChannelsLast3d
             : at::MemoryFormat::Contiguous;
}

void check_channel_param(const char* op, const char* arg, const at::Tensor& p,
                         const at::Tensor& x, int64_t C) {
  check_same_device(op, arg, p, x);
  M3D_CHECK_ARG(p.dim() == 1 && p.size(0) == C, op, arg, p,
                "1-D of size Cout = " + std::to_string(C));
  check_float(op, arg, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_stats(
    const at::Tensor& y, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  if (!training) {
    auto mean = acc_param(*running_mean, y).clone();
    auto var = acc_param(*running_var, y).clone();
    return {mean, (var + eps).rsqrt(), var};
  }
  const int64_t C = y.size(1), n = C ? y.numel() / C : 0;
  if (n == 0) {
    // An empty batch: F.batch_norm returns an empty output and leaves the running statistics
    // alone; the statistics of nothing are NaN (as bn_stats') and the wrapper skips the update.
    auto nan = at::full({C}, std::numeric_limits<double>::quiet_NaN(),
                        y.options().dtype(acc_dtype(y)));
    return {nan, nan.clone(), nan.clone()};
  }
  M3D_CHECK(n > 1, "Expected more than 1 value per channel when training, got input size ",
              y.sizes());
  static auto stats = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("med3d_ext::bn_stats", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>();
  auto [mean, var] = stats.call(y, false);
  auto invstd = (var + eps).rsqrt();
  return {mean, invstd, var * (double(n) / double(n - 1))};
}

ConvStats conv_bn_stats_generic(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var,
                                const c10::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool training, double eps,
                                int64_t conv_algo, StatsFn stats) {
  ConvArgs conv{stride, padding, dilation, conv_algo};
  const auto fmt = check_conv_bn_relu_args(op, x, weight, residual, conv);
  const int64_t C = weight.size(0);
  check_channel_param(op, "bn_weight", bn_weight, x, C);
  check_channel_param(op, "bn_bias", bn_bias, x, C);
  if (!training) {
    M3D_CHECK(running_mean.has_value() && running_var.has_value(), "med3d_ext.", op,
                ": running_mean and running_var are required when training=False");
  } else {
    // F.batch_norm's rule: eps <= 0 (or NaN) turns a constant channel into NaN / inf
    M3D_CHECK(eps > 0, "med3d_ext.", op, ": argument 'eps' must be positive when training, got ",
              eps);
  }
  if (running_mean.has_value()) check_channel_param(op, "running_mean", *running_mean, x, C);
  if (running_var.has_value()) check_channel_param(op, "running_var", *running_var, x, C);

  ConvStats r;
  r.fmt = fmt;
  r.y = conv3d_forward(x, weight, conv, fmt);
  if (training && stats && r.y.numel() > 0) {
    const int64_t n = r.y.numel() / C;
    M3D_CHECK(n > 1, "Expected more than 1 value per channel when training, got input size ",
                r.y.sizes());
    std::tie(r.mean, r.invstd, r.var) = stats(r.y, eps);
  } else {
    std::tie(r.mean, r.invstd, r.var) =
        bn_forward_stats(r.y, running_mean, running_var, training, eps);
  }
  return r;
}

at::Tensor autocast_weight(const at::Tensor& weight, const at::Tensor& x) {
  const auto dev = x.device().type();
  const auto xt = x.scalar_type();
  // is_autocast_available first: the other two throw for device types without autocast (meta)
  if (weight.scalar_type() == at::kFloat && (xt == at::kBFloat16 || xt == at::kHalf) &&
      at::autocast::is_autocast_available(dev) && at::autocast::is_autocast_enabled(dev) &&
      at::autocast::get_autocast_dtype(dev) == xt)
    return weight.to(xt);
  return weight;
}

ConvBnReluOut conv_bn_relu3d_generic(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var,
                                     const c10::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool training, double eps,
                                     bool relu, int64_t conv_algo, ApplyFn apply,
                                     StatsFn stats) {
  // (already cast when the op's autograd kernel ran; a call below autograd arrives uncast)
  auto [fmt, y, mean, invstd, var] =
      conv_bn_stats_generic("conv_bn_relu3d", x, autocast_weight(weight, x), bn_weight, bn_bias,
                            running_mean,
                            running_var, residual, stride, padding, dilation, training, eps,
                            conv_algo, stats);
  at::Tensor out = at::empty_like(y, y.options(), fmt);
  at::Tensor r;
  if (residual.has_value()) r = residual->to(y.scalar_type()).contiguous(fmt);
  if (y.numel() > 0)
    apply(y, mean, invstd, acc_param(bn_weight, y), acc_param(bn_bias, y),
          residual.has_value() ? &r : nullptr, relu, out);
  return {out, y, mean, invstd, var};
}

at::Tensor conv_bias_relu3d_generic(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& residual,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool relu, int64_t conv_algo,
                                    ApplyFn apply) {
  const char* op = "conv_bias_relu3d";
  ConvArgs conv{stride, padding, dilation, conv_algo};
  const auto fmt = check_conv_bn_relu_args(op, x, weight, residual, conv);
  const int64_t C = weight.size(0);
  if (bias.has_value()) check_channel_param(op, "bias", *bias, x, C);
  at::Tensor y = conv3d_forward(x, weight, conv, fmt);
  if (!bias.has_value() && !residual.has_value() && !relu) return y;
  // The same epilogue kernel with mean 0, invstd 1, weight 1 (undefined tensors: no
  // per-call zeros/ones to allocate and fill): out = act(y + b [+ r]).
  at::Tensor b = bias.has_value() ? acc_param(*bias, y) : at::Tensor();
  at::Tensor r;
  if (residual.has_value()) r = residual->to(y.scalar_type()).contiguous(fmt);
  at::Tensor out = y.numel() > 0 ? y : at::empty_like(y);  // written in place over y
  if (y.numel() > 0)
    apply(y, at::Tensor(), at::Tensor(), at::Tensor(), b, residual.has_value() ? &r : nullptr,
          relu, out);
  return out;
}

namespace {

// y is a 5-D float conv output; mean, invstd and the affine parameters are per-channel of it.
void check_bn_state(const char* op, const at::Tensor& y, const at::Tensor& mean,
                    const at::Tensor& invstd, const at::Tensor& bn_weight,
                    const at::Tensor& bn_bias) {
  M3D_CHECK_ARG(y.defined() && y.dim() == 5, op, "y", y, "5-D (N, C, D, H, W)");
  check_float(op, "y", y);
  const int64_t C = y.size(1);
  check_channel_param(op, "mean", mean, y, C);
  check_channel_param(op, "invstd", invstd, y, C);
  check_channel_param(op, "bn_weight", bn_weight, y, C);
  check_channel_param(op, "bn_bias", bn_bias, y, C);
}

}  // namespace

at::Tensor bn_act_generic(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                          const at::Tensor& bn_weight, const at::Tensor& bn_bias, bool relu,
                          ApplyFn apply) {
  check_bn_state("bn_act", y, mean, invstd, bn_weight, bn_bias);
  const auto fmt = layout_of(y);
  const at::Tensor yc = y.contiguous(fmt);
  at::Tensor out = at::empty_like(yc, yc.options(), fmt);
  if (yc.numel() > 0)
    apply(yc, acc_param(mean, yc), acc_param(invstd, yc), acc_param(bn_weight, yc),
          acc_param(bn_bias, yc), nullptr, relu, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> prepare_bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& relu_out) {
  const char* op = "bn_relu_backward";
  check_bn_state(op, y, mean, invstd, bn_weight, bn_bias);
  M3D_CHECK_ARG(grad_out.defined() && grad_out.sizes() == y.sizes(), op, "grad_out", grad_out,
                "of y's shape");
  check_same_device(op, "grad_out", grad_out, y);
  const auto fmt = layout_of(y);
  at::Tensor r;
  if (relu_out.has_value()) {
    M3D_CHECK_ARG(relu_out->sizes() == y.sizes(), op, "relu_out", *relu_out, "of y's shape");
    check_same_device(op, "relu_out", *relu_out, y);
    r = relu_out->to(y.scalar_type()).contiguous(fmt);
  }
  return {grad_out.to(y.scalar_type()).contiguous(fmt), r};
}

namespace {

ConvBnReluOut conv_bn_relu3d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                 const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var,
                                 const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool training,
                                 double eps, bool relu, int64_t conv_algo) {
  return conv_bn_relu3d_generic(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                stride, padding, dilation, training, eps, relu, conv_algo,
                                &bn_act_forward_cpu);
}

at::Tensor conv_bias_relu3d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                                int64_t conv_algo) {
  return conv_bias_relu3d_generic(x, weight, bias, residual, stride, padding, dilation, relu,
                                  conv_algo, &bn_act_forward_cpu);
}

}  // namespace

at::Tensor bn_act_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                      const at::Tensor& bn_weight, const at::Tensor& bn_bias, bool relu) {
  return bn_act_generic(y, mean, invstd, bn_weight, bn_bias, relu, &bn_act_forward_cpu);
}

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) {
  m.impl("bn_act", &bn_act_cpu);
  m.impl("conv_bn_relu3d", &conv_bn_relu3d_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
  m.impl("conv_bias_relu3d", &conv_bias_relu3d_cpu);
}

}  // namespace med3d_ext
