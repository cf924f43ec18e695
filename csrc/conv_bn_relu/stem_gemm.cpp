// implicit_gemm_conv3d on the CPU, and the entry checks of both devices (see stem_gemm.h). The
// CPU runs im2col3d's GEMMs: the same sums, the columns built in chunks of rows.
#include <torch/library.h>

#include "conv_bn_relu.h"
#include "im2col.h"
#include "stem_gemm.h"
#include "../common/checks.h"

namespace med3d_ext {

int64_t check_implicit_gemm_conv3d(const at::Tensor& x, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t align, im2col::Geometry& g) {
  const char* op = "implicit_gemm_conv3d";
  M3D_CHECK_ARG(x.defined() && x.dim() == 5, op, "x", x, "5-D (N, Cin, D, H, W)");
  M3D_CHECK_ARG(weight.defined() && weight.dim() == 5 && weight.size(1) == x.size(1), op,
                "weight", weight,
                "(Cout, Cin, kD, kH, kW) with Cin = x.size(1) = " + std::to_string(x.size(1)));
  M3D_CHECK_ARG(weight.scalar_type() == x.scalar_type(), op, "weight", weight,
                std::string("of x's dtype (") + c10::toString(x.scalar_type()) + ")");
  check_same_device(op, "weight", weight, x);
  return im2col::geometry(op, x, weight.sizes().slice(2), stride, padding, dilation, align, 0,
                          -1, g);
}

int64_t check_implicit_gemm_weight_grad(const at::Tensor& grad_rows, const at::Tensor& x,
                                        at::IntArrayRef weight_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t align, im2col::Geometry& g) {
  const char* op = "implicit_gemm_conv3d_weight_grad";
  M3D_CHECK_ARG(x.defined() && x.dim() == 5, op, "x", x, "5-D (N, Cin, D, H, W)");
  M3D_CHECK(weight_size.size() == 5 && weight_size[1] == x.size(1) && weight_size[0] >= 0,
            "med3d_ext.", op, ": argument 'weight_size' must be (Cout, Cin, kD, kH, kW) with "
            "Cin = x.size(1) = ", x.size(1), ", got ", weight_size);
  const int64_t rows =
      im2col::geometry(op, x, weight_size.slice(2), stride, padding, dilation, align, 0, -1, g);
  M3D_CHECK_ARG(grad_rows.defined() && grad_rows.dim() == 2 && grad_rows.size(0) == rows &&
                    grad_rows.size(1) == weight_size[0],
                op, "grad_rows", grad_rows,
                "(N*D'*H'*W', Cout) = (" + std::to_string(rows) + ", " +
                    std::to_string(weight_size[0]) + ")");
  M3D_CHECK_ARG(grad_rows.scalar_type() == x.scalar_type(), op, "grad_rows", grad_rows,
                std::string("of x's dtype (") + c10::toString(x.scalar_type()) + ")");
  check_same_device(op, "grad_rows", grad_rows, x);
  return rows;
}

at::Tensor implicit_gemm_weight_grad_by_im2col(const at::Tensor& grad_rows, const at::Tensor& x,
                                               at::IntArrayRef weight_size,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation) {
  return im2col_conv_weight_grad(grad_rows.contiguous(), x, c10::fromIntArrayRefSlow(weight_size),
                                 ConvArgs{stride, padding, dilation, kIm2col});
}

namespace {

at::Tensor implicit_gemm_conv3d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  im2col::Geometry g;
  check_implicit_gemm_conv3d(x, weight, stride, padding, dilation, 8, g);
  return im2col_conv_rows(x, weight, ConvArgs{stride, padding, dilation, kIm2col});
}

at::Tensor implicit_gemm_conv3d_weight_grad_cpu(const at::Tensor& grad_rows, const at::Tensor& x,
                                                at::IntArrayRef weight_size,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation) {
  im2col::Geometry g;
  check_implicit_gemm_weight_grad(grad_rows, x, weight_size, stride, padding, dilation, 8, g);
  return implicit_gemm_weight_grad_by_im2col(grad_rows, x, weight_size, stride, padding,
                                             dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) {
  m.impl("implicit_gemm_conv3d", &implicit_gemm_conv3d_cpu);
  m.impl("implicit_gemm_conv3d_weight_grad", &implicit_gemm_conv3d_weight_grad_cpu);
}

}  // namespace med3d_ext
