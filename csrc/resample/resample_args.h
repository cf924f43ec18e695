// Host-side argument checking, output allocation and type dispatch for the resample ops, shared
// by the CPU and CUDA entry points so both validate and lay out tensors identically.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>
#include <vector>

#include "../common/checks.h"
#include "resample.h"
#include "resample_voxel.h"

namespace med3d_ext {
namespace rs {

// iostream-free on purpose (see common/checks.h)
inline std::string list_str(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

inline void check_size(const char* op, const char* arg, at::IntArrayRef size, size_t rank) {
  bool ok = size.size() == rank;
  for (auto v : size) ok = ok && v >= 0;
  M3D_CHECK(ok, "med3d_ext.", op, ": argument '", arg, "' must be ", rank,
              " non-negative ints, got ", list_str(size));
}

inline void check_modes(const char* op, int64_t mode, int64_t pad) {
  M3D_CHECK(mode == kBilinear || mode == kNearest, "med3d_ext.", op,
              ": argument 'mode' must be 0 (bilinear) or 1 (nearest), got ", mode);
  M3D_CHECK(pad == kZeros || pad == kBorder || pad == kReflection, "med3d_ext.", op,
              ": argument 'padding_mode' must be 0 (zeros), 1 (border) or 2 (reflection), got ",
              pad);
}

inline void check_theta(const char* op, const at::Tensor& theta, const at::Tensor& image) {
  M3D_CHECK_ARG(theta.defined() && theta.dim() == 3 && theta.size(0) == image.size(0) &&
                    theta.size(1) == 3 && theta.size(2) == 4,
                op, "theta", theta,
                "(N, 3, 4) with N = image.size(0) = " + std::to_string(image.size(0)));
  check_float(op, "theta", theta);
  check_same_device(op, "theta", theta, image);
}

// grid_sample needs something to sample from (an empty batch or channel axis is fine).
inline void check_spatial(const char* op, const char* arg, const at::Tensor& t) {
  M3D_CHECK_ARG(t.size(2) > 0 && t.size(3) > 0 && t.size(4) > 0, op, arg, t,
                "non-empty along its spatial axes (D, H, W)");
}

inline bool is_floating(const at::Tensor& t) { return at::isFloatingType(t.scalar_type()); }

// Coordinate dtype: float64 for float64 images, float32 otherwise (grid_sample's grid dtype).
inline at::ScalarType coord_type(const at::Tensor& image) {
  return image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Tensors of one call, contiguous, in the dtypes the kernels read, plus the outputs.
struct Prepared {
  at::Tensor image, image_out, label, label_out, theta, elastic, intensity, seed;
  bool fused = false;
};

// Fill PairArgs' sizes and pointers from the prepared tensors.
template <typename scalar_t, typename label_t, typename T>
PairArgs<scalar_t, label_t, T> make_args(const Prepared& p, int64_t pad, bool align) {
  PairArgs<scalar_t, label_t, T> a;
  if (p.image.defined()) {
    a.image = p.image.const_data_ptr<scalar_t>();
    a.image_out = p.image_out.mutable_data_ptr<scalar_t>();
    a.C = p.image_out.size(1), a.D = p.image_out.size(2), a.H = p.image_out.size(3);
    a.W = p.image_out.size(4);
    a.ID = p.image.size(2), a.IH = p.image.size(3), a.IW = p.image.size(4);
  }
  if (p.label.defined()) {
    a.label = static_cast<const label_t*>(p.label.const_data_ptr());
    a.label_out = static_cast<label_t*>(p.label_out.mutable_data_ptr());
    a.LC = p.label_out.size(1), a.LD = p.label_out.size(2), a.LH = p.label_out.size(3);
    a.LW = p.label_out.size(4);
    a.LID = p.label.size(2), a.LIH = p.label.size(3), a.LIW = p.label.size(4);
  }
  a.fused = p.fused;
  a.theta = p.theta.const_data_ptr<T>();
  if (p.elastic.defined()) {
    a.elastic = p.elastic.const_data_ptr<T>();
    a.ED = p.elastic.size(2), a.EH = p.elastic.size(3), a.EW = p.elastic.size(4);
  }
  if (p.intensity.defined()) a.intensity = p.intensity.const_data_ptr<float>();
  if (p.seed.defined()) a.seed = p.seed.const_data_ptr<int64_t>();
  a.pad = static_cast<int>(pad);
  a.align = align;
  return a;
}

// True when every offset inside one sample fits in int32 (offsets across samples use int64).
inline bool per_sample_fits_int32(const Prepared& p) {
  int64_t m = 0;
  for (const at::Tensor* t : {&p.image, &p.image_out, &p.label, &p.label_out})
    if (t->defined() && t->size(0) > 0) m = std::max(m, t->numel() / t->size(0));
  return fits_int32(m);
}

// Calls fn(PairArgs<scalar_t, label_t, T>, index_t{}) with the template types of this call:
// scalar_t the image dtype (uint8_t placeholder without image), label_t an unsigned integer of
// the label's element size (uint8_t placeholder without label).
template <typename Fn>
void dispatch_pair(const Prepared& p, int64_t pad, bool align, Fn&& fn) {
  auto with_label = [&](auto scalar_tag, auto coord_tag) {
    using scalar_t = decltype(scalar_tag);
    using T = decltype(coord_tag);
    auto go = [&](auto label_tag) {
      using label_t = decltype(label_tag);
      auto args = make_args<scalar_t, label_t, T>(p, pad, align);
      M3D_INDEX_SWITCH(per_sample_fits_int32(p), index_t, [&] { fn(args, index_t{}); });
    };
    switch (p.label.defined() ? p.label.element_size() : 1) {
      case 1: go(uint8_t{}); break;
      case 2: go(uint16_t{}); break;
      case 4: go(uint32_t{}); break;
      case 8: go(uint64_t{}); break;
      default: M3D_CHECK(false, "med3d_ext: unsupported label element size ",
                           p.label.element_size());
    }
  };
  if (!p.image.defined()) {
    if (p.theta.scalar_type() == at::kDouble) with_label(uint8_t{}, double{});
    else with_label(uint8_t{}, float{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.image.scalar_type(), "resample", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    with_label(scalar_t{}, T{});
  });
}

// affine_resample: checks, then the image (bilinear) or the "label" part (nearest) of a pair.
inline Prepared prepare_single(const at::Tensor& image, const at::Tensor& theta,
                               at::IntArrayRef size, int64_t mode, int64_t pad) {
  const char* op = "affine_resample";
  check_dim(op, "image", image, 5);
  check_modes(op, mode, pad);
  check_size(op, "size", size, 5);
  M3D_CHECK_ARG(size[0] == image.size(0) && size[1] == image.size(1), op, "image", image,
                "(N, C, ...) with N, C equal to size[0], size[1] = " + list_str(size));
  check_theta(op, theta, image);
  check_spatial(op, "image", image);
  M3D_CHECK_ARG(mode == kNearest || is_floating(image), op, "image", image,
                "floating point for mode='bilinear' (use mode='nearest' for integer images)");
  Prepared p;
  p.theta = theta.to(coord_type(image)).reshape({image.size(0), 12}).contiguous();
  auto out = at::empty(size, image.options().memory_format(at::MemoryFormat::Contiguous));
  if (mode == kBilinear) {
    p.image = image.contiguous();
    p.image_out = out;
  } else {
    p.label = image.contiguous();
    p.label_out = out;
  }
  return p;
}

inline Prepared prepare_pair(const at::Tensor& image, const at::Tensor& label,
                             const at::Tensor& theta, at::IntArrayRef size,
                             at::IntArrayRef label_size, const std::optional<at::Tensor>& elastic,
                             const std::optional<at::Tensor>& intensity,
                             const std::optional<at::Tensor>& seed, int64_t pad) {
  const char* op = "affine_resample_pair";
  check_dim(op, "image", image, 5);
  check_float(op, "image", image);
  check_modes(op, kBilinear, pad);
  check_size(op, "size", size, 5);
  check_size(op, "label_size", label_size, 3);
  M3D_CHECK_ARG(size[0] == image.size(0) && size[1] == image.size(1), op, "image", image,
                "(N, C, ...) with N, C equal to size[0], size[1] = " + list_str(size));
  M3D_CHECK_ARG(label.defined() && label.dim() == 5 && label.size(0) == image.size(0), op,
                "label", label, "(N, C_label, D, H, W) with N = image.size(0)");
  check_same_device(op, "label", label, image);
  check_theta(op, theta, image);
  check_spatial(op, "image", image);
  check_spatial(op, "label", label);
  const int64_t N = image.size(0);
  const auto T = coord_type(image);
  Prepared p;
  p.theta = theta.to(T).reshape({N, 12}).contiguous();
  p.image = image.contiguous();
  p.image_out = at::empty(size, image.options().memory_format(at::MemoryFormat::Contiguous));
  p.label = label.contiguous();
  p.label_out = at::empty({N, label.size(1), label_size[0], label_size[1], label_size[2]},
                          label.options().memory_format(at::MemoryFormat::Contiguous));
  p.fused = label_size[0] == size[2] && label_size[1] == size[3] && label_size[2] == size[4] &&
            label.size(2) == image.size(2) && label.size(3) == image.size(3) &&
            label.size(4) == image.size(4);
  if (elastic.has_value() && elastic->defined()) {
    const auto& e = *elastic;
    M3D_CHECK_ARG(e.dim() == 5 && e.size(0) == N && e.size(1) == 3 && e.size(2) > 0 &&
                      e.size(3) > 0 && e.size(4) > 0,
                  op, "elastic", e, "(N, 3, g_d, g_h, g_w) with N = image.size(0)");
    check_float(op, "elastic", e);
    check_same_device(op, "elastic", e, image);
    p.elastic = e.to(T).contiguous();
  }
  if (intensity.has_value() && intensity->defined()) {
    const auto& t = *intensity;
    M3D_CHECK_ARG(t.dim() == 2 && t.size(0) == N && t.size(1) == kIntensityFields, op,
                  "intensity", t, "(N, 6): scale, shift, gamma, noise_std, clip_min, clip_max");
    check_float(op, "intensity", t);
    check_same_device(op, "intensity", t, image);
    p.intensity = t.to(at::kFloat).contiguous();
  }
  if (seed.has_value() && seed->defined()) {
    const auto& s = *seed;
    M3D_CHECK_ARG(s.dim() == 1 && s.size(0) == N && s.scalar_type() == at::kLong, op, "seed", s,
                  "an int64 tensor of shape (N,)");
    check_same_device(op, "seed", s, image);
    p.seed = s.contiguous();
  }
  return p;
}

// resize: checks and output; the kernel reads `image` (N, C, ID, IH, IW) contiguous.
inline at::Tensor prepare_resize(const at::Tensor& image, at::IntArrayRef size, int64_t mode) {
  const char* op = "resize";
  check_dim(op, "image", image, 5);
  check_modes(op, mode, kZeros);
  check_size(op, "size", size, 3);
  M3D_CHECK_ARG(mode == kNearest || is_floating(image), op, "image", image,
                "floating point for mode='trilinear' (use mode='nearest' for integer images)");
  for (int k = 0; k < 3; ++k)
    M3D_CHECK_ARG(size[k] == 0 || image.size(2 + k) > 0, op, "image", image,
                  "non-empty along every spatial axis when resizing to " + list_str(size));
  return at::empty({image.size(0), image.size(1), size[0], size[1], size[2]},
                   image.options().memory_format(at::MemoryFormat::Contiguous));
}

// resize_backward: the gradient of resize (trilinear) with respect to an input of
// ``input_size`` (N, C, ID, IH, IW), from grad, the gradient of its (N, C, D, H, W) output.
inline at::Tensor prepare_resize_backward(const at::Tensor& grad, at::IntArrayRef input_size) {
  const char* op = "resize_backward";
  check_dim(op, "grad", grad, 5);
  M3D_CHECK_ARG(is_floating(grad), op, "grad", grad, "floating point");
  check_size(op, "input_size", input_size, 5);
  M3D_CHECK(input_size[0] == grad.size(0) && input_size[1] == grad.size(1), "med3d_ext.", op,
            ": input_size ", list_str(input_size), " must have grad's N and C, got grad of shape ",
            list_str(grad.sizes()));
  for (int k = 0; k < 3; ++k)
    M3D_CHECK(grad.size(2 + k) == 0 || input_size[2 + k] > 0, "med3d_ext.", op, ": input_size ",
              list_str(input_size), " is empty along an axis that grad ",
              list_str(grad.sizes()), " is not");
  return at::empty(input_size, grad.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace rs
}  // namespace med3d_ext
