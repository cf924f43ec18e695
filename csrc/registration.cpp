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
}
