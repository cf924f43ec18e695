// The convolution of the fused ops, forward and backward, by ConvAlgo (conv_bn_relu.h):
// ATen's convolution, or im2col3d's columns times the weight as one GEMM (im2col.h).
#include <ATen/core/dispatch/Dispatcher.h>

#include "conv_bn_relu.h"

namespace med3d_ext {
namespace {

// im2col3d's column count is rounded up to 8: 16-byte rows in bf16 / fp16, which cuBLAS's
// tensor-core kernels need (and any wider dtype is aligned by it too).
constexpr int64_t kColumnAlign = 8;

at::Tensor columns(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv) {
  using Sig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, int64_t);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("med3d_ext::im2col3d", "")
                             .typed<Sig>();
  return op.call(x, weight.sizes().slice(2), conv.stride, conv.padding, conv.dilation,
                 kColumnAlign);
}

// weight (Cout, Cin, kD, kH, kW) as the (Cout, Kp) matrix of im2col3d's column order, zero
// in the padding columns.
int64_t taps(const at::Tensor& weight) {  // K = Cin * kD * kH * kW
  return weight.size(1) * weight.size(2) * weight.size(3) * weight.size(4);
}

at::Tensor weight_matrix(const at::Tensor& weight, int64_t Kp) {
  const int64_t K = taps(weight);
  at::Tensor w = weight.reshape({weight.size(0), K});
  return Kp == K ? w : at::constant_pad_nd(w, {0, Kp - K});
}

at::Tensor conv3d_im2col(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv,
                         const std::vector<int64_t>& out_sizes, at::MemoryFormat fmt) {
  const at::Tensor cols = columns(x, weight, conv);  // (M, Kp)
  // (M, Kp) x (Kp, Cout): the rows are output voxels in (n, d, h, w) order, so the product is
  // y in channels_last_3d, with no copy.
  const at::Tensor y = at::mm(cols, weight_matrix(weight, cols.size(1)).t());
  const auto& s = out_sizes;  // (N, Cout, D', H', W')
  return y.view({s[0], s[2], s[3], s[4], s[1]}).permute({0, 4, 1, 2, 3}).contiguous(fmt);
}

// grad_weight = grad_y^T (Cout, M) x columns (M, Kp), the columns built again (never kept).
at::Tensor conv3d_im2col_weight_grad(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, const ConvArgs& conv) {
  const at::Tensor cols = columns(x, weight, conv);
  const int64_t cout = weight.size(0), K = taps(weight);
  const at::Tensor g = grad_y.to(x.scalar_type())
                           .contiguous(at::MemoryFormat::ChannelsLast3d)
                           .permute({0, 2, 3, 4, 1})
                           .reshape({cols.size(0), cout});  // a view: (n, d, h, w, c) order
  at::Tensor gw = at::mm(g.t(), cols);                      // (Cout, Kp)
  if (gw.size(1) != K) gw = gw.narrow(1, 0, K);
  return gw.reshape(weight.sizes()).contiguous(weight.suggest_memory_format());
}

}  // namespace

at::Tensor conv3d_forward(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv,
                          at::MemoryFormat fmt) {
  if (conv.algo == kIm2col) {
    std::vector<int64_t> sizes{x.size(0), weight.size(0)};
    for (int i = 0; i < 3; ++i) {
      const int64_t span = conv.dilation[i] * (weight.size(2 + i) - 1) + 1;
      sizes.push_back((x.size(2 + i) + 2 * conv.padding[i] - span) / conv.stride[i] + 1);
    }
    return conv3d_im2col(x, weight, conv, sizes, fmt);
  }
  at::Tensor y = at::convolution(x, weight, c10::nullopt, conv.stride, conv.padding,
                                 conv.dilation, false, {0, 0, 0}, 1);
  return y.contiguous(fmt);
}

std::pair<at::Tensor, at::Tensor> conv3d_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                  const at::Tensor& weight, const ConvArgs& conv,
                                                  bool need_x, bool need_w) {
  if (!(need_x || need_w)) return {};
  at::Tensor gw;
  if (conv.algo == kIm2col && need_w) {
    gw = conv3d_im2col_weight_grad(grad_y, x, weight, conv);
    if (!need_x) return {at::Tensor(), gw};
    need_w = false;  // the input gradient (rare: the stem's input is data) from ATen below
  }
  auto [gx, gw_aten, gb] = at::convolution_backward(
      grad_y, x, weight, c10::nullopt, conv.stride, conv.padding, conv.dilation, false,
      {0, 0, 0}, 1, {need_x, need_w, false});
  return {gx, gw.defined() ? gw : gw_aten};
}

}  // namespace med3d_ext
