// Every med3d_ext op schema, declared once. Implementations register per dispatch key next to
// their kernels (TORCH_LIBRARY_IMPL(med3d_ext, CPU|CUDA, m) in each op family's folder); fake
// (meta) kernels and autograd are registered from Python, in med3d_ext/ops/.
//
// Schemas are functional: no op mutates its inputs, so torch.library.register_autograd and
// torch.compile apply. Where a buffer must be updated (BatchNorm running stats), the Python
// wrapper does it from the op's returned values.
#include <torch/library.h>

TORCH_LIBRARY(med3d_ext, m) {
  // --- conv_bn_relu/ ---
  m.def("bn_stats(Tensor x, bool unbiased=False) -> (Tensor mean, Tensor var)");
  m.def(
      "conv_bn_relu3d(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, Tensor? residual, int[3] stride, "
      "int[3] padding, int[3] dilation, bool training, float eps, bool relu) "
      "-> (Tensor out, Tensor y, Tensor mean, Tensor invstd, Tensor var)");
  m.def(
      "bn_relu_backward(Tensor grad_out, Tensor y, Tensor mean, Tensor invstd, Tensor bn_weight, "
      "Tensor bn_bias, Tensor? residual, bool training, bool relu) "
      "-> (Tensor grad_y, Tensor grad_bn_weight, Tensor grad_bn_bias, Tensor grad_residual)");
  m.def(
      "conv_bias_relu3d(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[3] stride, "
      "int[3] padding, int[3] dilation, bool relu) -> Tensor");
}
