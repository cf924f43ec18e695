// Fused conv3d + BatchNorm + ReLU (+ residual), forward and backward, CPU and CUDA.
//
// The convolutions stay on ATen (cuDNN / oneDNN; the few-channel stem: im2col3d + cuBLAS, see
// ConvAlgo). Around them:
//   forward   y = conv3d(x, weight)                                    (ATen)
//             mean, invstd, var_unbiased  = batch statistics of y        (bn_stats, one pass)
//             out = act((y - mean) * weight_c * invstd + bias_c [+ residual])   (one pass)
//   backward  g = grad_out * [z > 0]   (mask recomputed from y; with a residual, read from the
//                                       output, which the next layer keeps anyway)
//             sum_g, sum_gyc = per-channel sums of g and g * (y - mean)    (one reduction pass)
//             grad_y = A (g - k1) - Bp (y - mean)                          (one apply pass)
//             grad_x, grad_weight = convolution_backward(grad_y, ...)      (ATen, the autograd)
// Only y, mean and invstd are saved for backward (memory-saving: no normalised output is kept;
// a residual layer keeps its output instead of the residual: the block output that the next
// block keeps anyway, where the residual, e.g. a downsample branch's output, may be kept only
// for this).
//
// Ops (schemas in csrc/registration.cpp):
//   conv_bn_relu3d(x (N,Cin,D,H,W), weight (Cout,Cin,kD,kH,kW), bn_weight (Cout), bn_bias (Cout),
//                  running_mean? (Cout), running_var? (Cout), residual? (N,Cout,D',H',W'),
//                  stride[3], padding[3], dilation[3], training, eps, relu, conv_algo)
//       -> out (N,Cout,D',H',W') in x's dtype, y (same shape: the conv output, for backward),
//          mean (Cout), invstd (Cout), var (Cout; the unbiased batch variance when training,
//          for the running-stat update, else a copy of running_var). Statistics are fp32
//          (fp64 for fp64 input).
//   bn_relu_backward(grad_out, y, mean, invstd, bn_weight, bn_bias, relu_out?, training, relu)
//       -> grad_y (like y), grad_bn_weight (Cout), grad_bn_bias (Cout),
//          grad_residual (like y; an empty (0,) tensor when relu_out is None)
//       relu_out: the forward's out of a layer with a residual; its sign is the ReLU mask
//       (out > 0 iff z > 0, and NaN stays NaN: torch.relu's backward rule), and grad_residual
//       (the masked gradient) is returned
//   conv_bias_relu3d(x, weight, bias?, residual?, stride, padding, dilation, relu, conv_algo)
//       -> out
//       inference epilogue for BN folded into the conv: act(conv3d(x, w) + bias [+ residual]).
//
// Layout: out, y and grad_y are channels_last_3d when x or weight is (as cuDNN chooses),
// otherwise contiguous; residual and grad_out are brought to that layout.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "../common/macros.h"

namespace med3d_ext {

// ---- per-element math, shared by the CPU and CUDA kernels ---------------------------------

// Normalised, shifted, optionally residual-added pre-activation. Subtracting the mean first
// (rather than folding it into a shift) keeps precision when |mean| >> std.
template <typename acc_t>
M3D_HOST_DEVICE acc_t bn_pre_act(acc_t y, acc_t mean, acc_t scale, acc_t bias, acc_t r) {
  return (y - mean) * scale + bias + r;
}

// ReLU as torch.relu: a NaN stays NaN (written "z <= 0 ? 0 : z", not "z > 0 ? z : 0", which
// would turn a diverging layer's NaN into a silent 0).
template <bool kRelu, typename acc_t>
M3D_HOST_DEVICE acc_t bn_act(acc_t z) {
  if constexpr (kRelu) return z <= acc_t(0) ? acc_t(0) : z;
  return z;
}

// grad_out masked by the ReLU recomputed from the pre-activation, as threshold_backward: zero
// where z <= 0, passed through elsewhere (NaN included).
template <bool kRelu, typename acc_t>
M3D_HOST_DEVICE acc_t bn_masked_grad(acc_t grad_out, acc_t z) {
  if constexpr (kRelu) return z <= acc_t(0) ? acc_t(0) : grad_out;
  return grad_out;
}

// Backward apply: grad_y = A * (g - k1) - Bp * (y - mean), where in training
//   A = w * invstd, k1 = sum_g / n, Bp = A * invstd * sum_gyc * invstd / n
// and in eval k1 = Bp = 0.
template <typename acc_t>
M3D_HOST_DEVICE acc_t bn_grad_input(acc_t g, acc_t y, acc_t mean, acc_t A, acc_t k1, acc_t Bp) {
  // Bp = 0 (eval mode): no y term at all, so a NaN in y does not leak into a finite gradient
  // (0 * NaN is NaN), as in PyTorch's eval-mode BatchNorm backward.
  const acc_t lin = A * (g - k1);
  return Bp == acc_t(0) ? lin : lin - Bp * (y - mean);
}

// Per-channel backward coefficients from the reduced sums.
template <typename acc_t>
struct BnBwdCoef {
  acc_t A, k1, Bp;
};

template <typename acc_t>
M3D_HOST_DEVICE BnBwdCoef<acc_t> bn_bwd_coef(acc_t w, acc_t invstd, acc_t sum_g, acc_t sum_gyc,
                                             acc_t n, bool training) {
  const acc_t A = w * invstd;
  if (!training) return {A, acc_t(0), acc_t(0)};
  return {A, sum_g / n, A * invstd * invstd * sum_gyc / n};
}

// ---- entry points --------------------------------------------------------------------------

// How the convolution runs. kAten: at::convolution (cuDNN / oneDNN) and
// at::convolution_backward. kIm2col: im2col3d's columns times the weight as one GEMM (at::mm,
// cuBLAS), and the weight gradient as the transposed GEMM over columns built again (im2col.h):
// for the few-channel 7^3 stem, which cuDNN runs with a slow generic kernel. kImplicitGemm: the
// same GEMMs with the columns gathered tile by tile into shared memory and never written out
// (stem_gemm.h; CUDA bf16/fp16 with Cout a multiple of 64, kIm2col's math elsewhere).
enum ConvAlgo : int64_t { kAten = 0, kIm2col = 1, kImplicitGemm = 2 };

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t algo = kAten;
};

// A per-channel argument: on x's device, 1-D of size C, floating point (names it otherwise).
void check_channel_param(const char* op, const char* arg, const at::Tensor& p,
                         const at::Tensor& x, int64_t C);

// Checks shared by both devices; returns the output memory format.
at::MemoryFormat check_conv_bn_relu_args(const char* op, const at::Tensor& x,
                                         const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& residual,
                                         const ConvArgs& conv);

// y = conv3d(x, weight) by conv.algo, in `fmt`.
at::Tensor conv3d_forward(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv,
                          at::MemoryFormat fmt);
// kIm2col builds its columns in chunks of rows of at most this many bytes (conv3d.cpp; the
// environment variable MED3D_EXT_IM2COL_CHUNK_BYTES sets the initial value, default 1 GiB).
int64_t im2col_chunk_bytes();
void set_im2col_chunk_bytes(int64_t bytes);

// kIm2col's two GEMMs (conv3d.cpp), on either device: y as (N*D'*H'*W', Cout) rows in
// (n, d, h, w) order (y's channels_last_3d memory), and the weight gradient (weight_sizes, x's
// dtype) from grad_y's rows in the same order.
at::Tensor im2col_conv_rows(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv);
at::Tensor im2col_conv_weight_grad(const at::Tensor& grad_rows, const at::Tensor& x,
                                   c10::SymIntArrayRef weight_sizes, const ConvArgs& conv);

// (grad_x, grad_weight) of y = conv3d(x, weight) by conv.algo; undefined where not needed.
std::pair<at::Tensor, at::Tensor> conv3d_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                  const at::Tensor& weight, const ConvArgs& conv,
                                                  bool need_x, bool need_w);

// Statistics for the forward pass: (mean, invstd, var) as described above.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_stats(
    const at::Tensor& y, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps);

at::Tensor acc_param(const at::Tensor& p, const at::Tensor& like_y);

// The convolution weight under autocast: an fp32 weight with a bf16/fp16 x is cast to x's dtype
// while autocast is on for x's device with that dtype (the Python wrapper leaves the cast to the
// op, so that backward keeps the fp32 parameter, not a copy). Any other pair is returned as it
// is, for the op's dtype check to refuse with its message.
at::Tensor autocast_weight(const at::Tensor& weight, const at::Tensor& x);
at::ScalarType acc_dtype(const at::Tensor& y);

using ConvBnReluOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// The per-device epilogue: out = act((y - mean) * w * invstd + b [+ *r]); y, r, out share a
// layout (contiguous or channels_last_3d); per-channel tensors are contiguous, acc dtype, or
// undefined for mean 0, invstd 1, w 1, b 0.
using ApplyFn = void (*)(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& w, const at::Tensor& b, const at::Tensor* r, bool relu,
                         at::Tensor& out);

// Optional per-device training statistics of y: (mean, invstd, unbiased var); y has more
// than one value per channel. Null: bn_stats + ATen.
using StatsFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor& y,
                                                                   double eps);

// The convolution and its BatchNorm statistics, with every argument check of conv_bn_relu3d:
// shared by conv_bn_relu3d and the stem's conv_bn_relu_maxpool3d (bn_relu_pool.h).
struct ConvStats {
  at::MemoryFormat fmt;  // of y and of every output
  at::Tensor y, mean, invstd, var;
};
ConvStats conv_bn_stats_generic(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var,
                                const c10::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool training, double eps,
                                int64_t conv_algo, StatsFn stats);

ConvBnReluOut conv_bn_relu3d_generic(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var,
                                     const c10::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool training, double eps,
                                     bool relu, int64_t conv_algo, ApplyFn apply,
                                     StatsFn stats = nullptr);
at::Tensor conv_bias_relu3d_generic(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& residual,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool relu, int64_t conv_algo,
                                    ApplyFn apply);

// bn_act: out = act((y - mean) * w * invstd + b) in y's layout (checks, then `apply`).
at::Tensor bn_act_generic(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                          const at::Tensor& bn_weight, const at::Tensor& bn_bias, bool relu,
                          ApplyFn apply);

// Checks and layout shared by both devices' bn_relu_backward; returns the inputs brought to
// y's layout and dtype: (grad_out, relu_out-or-undefined).
std::tuple<at::Tensor, at::Tensor> prepare_bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& relu_out);
inline at::MemoryFormat layout_of(const at::Tensor& y) {
  return is_channels_last_3d(y) ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

// Device kernels: out = act((y - mean) * w * invstd + b [+ r]).
void bn_act_forward_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& w, const at::Tensor& b, const at::Tensor* r, bool relu,
                        at::Tensor& out);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& relu_out, bool training, bool relu);

}  // namespace med3d_ext
