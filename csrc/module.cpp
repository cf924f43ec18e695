// The pybind11 module med3d_ext._C. Importing it runs the static op registrations of every
// translation unit linked in; the module itself only reports how it was built.
//
// Compiled against the pybind11 headers that torch ships, so there is one pybind11 in the
// process.
#include <pybind11/pybind11.h>

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
}
