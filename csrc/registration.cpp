// Every med3d_ext op schema, declared once. Implementations register per dispatch key next to
// their kernels (TORCH_LIBRARY_IMPL(med3d_ext, CPU|CUDA, m) in each op family's folder); fake
// (meta) kernels are registered from Python, in med3d_ext/ops/, and so is autograd, except where
// host time matters: conv_bn_relu/conv_bn_relu_autograd.cpp and seg_loss/seg_loss_autograd.cpp.
//
// Schemas are functional: no op mutates its inputs, so torch.library.register_autograd and
// torch.compile apply. Where a buffer must be updated (BatchNorm running stats), the Python
// wrapper does it from the op's returned values.
#include <torch/library.h>

TORCH_LIBRARY(med3d_ext, m) {
  // --- conv_bn_relu/ ---
  m.def("bn_stats(Tensor x, bool unbiased=False) -> (Tensor mean, Tensor var)");
  // --- seg_loss/ --- (autograd registered in C++, seg_loss/seg_loss_autograd.cpp: host speed)
  m.def("multihead_seg_loss(Tensor[] logits, Tensor[] targets, Tensor? head_weights, "
        "Tensor? class_weights, float ce_weight, float dice_weight, float smooth, "
        "int ignore_index) -> (Tensor total, Tensor per_head, Tensor bad_labels, Tensor saved)");
  m.def("multihead_seg_loss_backward(Tensor[] logits, Tensor[] targets, Tensor saved, "
        "Tensor? grad_total, Tensor? grad_per_head, Tensor? head_weights, Tensor? class_weights, "
        "int ignore_index) -> Tensor[]");
  // --- resample/ --- (mode: 0 bilinear/trilinear, 1 nearest; padding_mode: 0 zeros, 1 border,
  // 2 reflection; intensity (N, 6) = scale, shift, gamma, noise_std, clip_min, clip_max)
  m.def("affine_resample(Tensor image, Tensor theta, int[] size, int mode=0, "
        "int padding_mode=0, bool align_corners=False) -> Tensor");
  m.def("affine_resample_pair(Tensor image, Tensor label, Tensor theta, int[] size, "
        "int[] label_size, Tensor? elastic=None, Tensor? intensity=None, Tensor? seed=None, "
        "int padding_mode=0, bool align_corners=False) -> (Tensor image_out, Tensor label_out)");
  m.def("resize(Tensor image, int[] size, int mode=0) -> Tensor");
  // the gradient of resize (trilinear) as a gather: deterministic, no atomics
  // SymInt[]: under torch.compile with dynamic shapes the input's sizes stay symbolic (with
  // int[], every new batch size was a recompile); the kernels take the concrete IntArrayRef
  m.def("resize_backward(Tensor grad, SymInt[] input_size) -> Tensor");
  // conv_algo (conv_bn_relu/conv_bn_relu.h, ConvAlgo): 0 the ATen convolution (cuDNN / oneDNN),
  // 1 im2col3d + one GEMM, 2 the implicit GEMM, for the few-channel stem.
  m.def(
      "conv_bn_relu3d(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, Tensor? residual, int[3] stride, "
      "int[3] padding, int[3] dilation, bool training, float eps, bool relu, int conv_algo=0) "
      "-> (Tensor out, Tensor y, Tensor mean, Tensor invstd, Tensor var)");
  // relu(batch_norm(y)) with given statistics: the epilogue alone (recomputing a fused layer's
  // output in backward instead of keeping it, med3d_ext.nn.fused)
  m.def("bn_act(Tensor y, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias, "
        "bool relu) -> Tensor");
  m.def(
      "bn_relu_backward(Tensor grad_out, Tensor y, Tensor mean, Tensor invstd, Tensor bn_weight, "
      "Tensor bn_bias, Tensor? relu_out, bool training, bool relu) "
      "-> (Tensor grad_y, Tensor grad_bn_weight, Tensor grad_bn_bias, Tensor grad_residual)");
  // the stem: maxpool3d(relu(batch_norm(conv3d(x)))) with a uint8 argmax (bn_relu_pool.h)
  m.def(
      "conv_bn_relu_maxpool3d(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, int[3] stride, int[3] padding, "
      "int[3] dilation, bool training, float eps, int[3] pool_kernel, int[3] pool_stride, "
      "int[3] pool_padding, int conv_algo=0) "
      "-> (Tensor out, Tensor y, Tensor mean, Tensor invstd, Tensor var, Tensor argmax)");
  m.def(
      "bn_relu_maxpool_backward(Tensor grad_out, Tensor y, Tensor argmax, Tensor mean, "
      "Tensor invstd, Tensor bn_weight, Tensor bn_bias, bool training, int[3] pool_kernel, "
      "int[3] pool_stride, int[3] pool_padding) "
      "-> (Tensor grad_y, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def(
      "conv_bias_relu3d(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[3] stride, "
      "int[3] padding, int[3] dilation, bool relu, int conv_algo=0) -> Tensor");
  // The input windows of a 3-D convolution as a (N*D'*H'*W', round_up(Cin*kD*kH*kW, align))
  // matrix, or its rows [row_start, row_start + rows) (rows=-1: to the end): the stem
  // convolution as one GEMM (conv_algo=1; conv_bn_relu/im2col.h)
  m.def("im2col3d(Tensor x, int[3] kernel_size, int[3] stride, int[3] padding, "
        "int[3] dilation, int align=8, int row_start=0, int rows=-1) -> Tensor");
  // The same GEMMs with the columns gathered into shared memory, never written out (conv_algo=2;
  // conv_bn_relu/stem_gemm.h): y's channels_last rows (N*D'*H'*W', Cout), and the weight
  // gradient from grad_y's rows
  m.def("implicit_gemm_conv3d(Tensor x, Tensor weight, int[3] stride, int[3] padding, "
        "int[3] dilation) -> Tensor");
  m.def("implicit_gemm_conv3d_weight_grad(Tensor grad_rows, Tensor x, int[] weight_size, "
        "int[3] stride, int[3] padding, int[3] dilation) -> Tensor");
}
