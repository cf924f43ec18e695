// The pybind11 module med3d_ext._C. Importing it runs the static op registrations of every
// translation unit linked in; the module itself reports how it was built and holds the one
// process-wide setting (the im2col chunk size).
//
// Compiled against the pybind11 headers that torch ships, so there is one pybind11 in the
// process.
#include <pybind11/pybind11.h>

#include "conv_bn_relu/conv_bn_relu.h"

#ifndef M3D_TORCH_VERSION
#define M3D_TORCH_VERSION "unknown"
#endif
#ifndef M3D_CUDA_VERSION
#define M3D_CUDA_VERSION ""
#endif
#ifndef M3D_CUDA_ARCHS
#define M3D_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "med3d_ext compiled kernels (ops are under torch.ops.med3d_ext)";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = M3D_TORCH_VERSION;
#ifdef M3D_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    info["cuda_version"] = M3D_CUDA_VERSION;
    info["cuda_archs"] = M3D_CUDA_ARCHS;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
  // The stem convolution's im2col chunk size (conv_bn_relu/conv3d.cpp), a process-wide setting
  // like torch.backends flags: med3d_ext.ops.conv_bn_relu.im2col_chunk_bytes wraps these.
  m.def("im2col_chunk_bytes", &med3d_ext::im2col_chunk_bytes);
  m.def("set_im2col_chunk_bytes", &med3d_ext::set_im2col_chunk_bytes);
}
