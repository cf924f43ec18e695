// CPU kernels for resize (F.interpolate, see resample.h): per-axis taps or source indices are
// tabulated once, rows are split over threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "resample.h"
#include "resample_args.h"

namespace med3d_ext {
namespace rs {
namespace {

// Rows per parallel chunk: enough voxels to amortise the scheduling.
inline int64_t row_grain(int64_t W) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1)); }

// F.interpolate(trilinear, align_corners=False): per-axis taps are tabulated once.
template <typename scalar_t>
void resize_linear_cpu(const at::Tensor& in, at::Tensor& out) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t NC = in.size(0) * in.size(1), ID = in.size(2), IH = in.size(3), IW = in.size(4);
  const int64_t D = out.size(2), H = out.size(3), W = out.size(4);
  std::vector<Lerp<T>> lz(D), ly(H), lx(W);
  for (int64_t i = 0; i < D; ++i) lz[i] = resize_linear<T>(i, ID, D);
  for (int64_t i = 0; i < H; ++i) ly[i] = resize_linear<T>(i, IH, H);
  for (int64_t i = 0; i < W; ++i) lx[i] = resize_linear<T>(i, IW, W);
  const scalar_t* src = in.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, NC * D * H, row_grain(W), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H, d = (r / H) % D, nc = r / (H * D);
      const scalar_t* p = src + nc * ID * IH * IW;
      const Lerp<T>& z = lz[d];
      const Lerp<T>& y = ly[h];
      const scalar_t* r00 = p + (z.i0 * IH + y.i0) * IW;
      const scalar_t* r01 = p + (z.i0 * IH + y.i1) * IW;
      const scalar_t* r10 = p + (z.i1 * IH + y.i0) * IW;
      const scalar_t* r11 = p + (z.i1 * IH + y.i1) * IW;
      scalar_t* o = dst + r * W;
      for (int64_t w = 0; w < W; ++w) {
        const Lerp<T>& x = lx[w];
        auto lerp_x = [&](const scalar_t* q) {
          return x.l0 * static_cast<T>(q[x.i0]) + x.l1 * static_cast<T>(q[x.i1]);
        };
        o[w] = static_cast<scalar_t>(z.l0 * (y.l0 * lerp_x(r00) + y.l1 * lerp_x(r01)) +
                                     z.l1 * (y.l0 * lerp_x(r10) + y.l1 * lerp_x(r11)));
      }
    }
  });
}

// F.interpolate(nearest): a bit copy through per-axis index tables, for any element type.
template <typename bits_t>
void resize_nearest_cpu(const at::Tensor& in, at::Tensor& out) {
  const int64_t NC = in.size(0) * in.size(1), ID = in.size(2), IH = in.size(3), IW = in.size(4);
  const int64_t D = out.size(2), H = out.size(3), W = out.size(4);
  std::vector<int64_t> iz(D), iy(H), ix(W);
  for (int64_t i = 0; i < D; ++i) iz[i] = resize_nearest(i, ID, D);
  for (int64_t i = 0; i < H; ++i) iy[i] = resize_nearest(i, IH, H);
  for (int64_t i = 0; i < W; ++i) ix[i] = resize_nearest(i, IW, W);
  const bits_t* src = static_cast<const bits_t*>(in.const_data_ptr());
  bits_t* dst = static_cast<bits_t*>(out.mutable_data_ptr());
  at::parallel_for(0, NC * D * H, row_grain(W), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H, d = (r / H) % D, nc = r / (H * D);
      const bits_t* q = src + ((nc * ID + iz[d]) * IH + iy[h]) * IW;
      bits_t* o = dst + r * W;
      for (int64_t w = 0; w < W; ++w) o[w] = q[ix[w]];
    }
  });
}

// Backward of the trilinear resize: a gather per input element (resize_grad_at), no scatter.
template <typename scalar_t>
void resize_backward_linear_cpu(const at::Tensor& g, at::Tensor& gi) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t NC = gi.size(0) * gi.size(1), ID = gi.size(2), IH = gi.size(3), IW = gi.size(4);
  const int64_t D = g.size(2), H = g.size(3), W = g.size(4);
  const scalar_t* src = g.const_data_ptr<scalar_t>();
  scalar_t* dst = gi.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, NC * ID * IH, row_grain(IW), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % IH, d = (r / IH) % ID, nc = r / (IH * ID);
      const scalar_t* p = src + nc * D * H * W;
      for (int64_t w = 0; w < IW; ++w)
        dst[r * IW + w] =
            static_cast<scalar_t>(resize_grad_at<T>(p, d, h, w, ID, IH, IW, D, H, W));
    }
  });
}

}  // namespace

at::Tensor resize_backward_cpu(const at::Tensor& grad, at::IntArrayRef input_size) {
  at::Tensor gi = prepare_resize_backward(grad, input_size);
  if (gi.numel() == 0) return gi;
  if (grad.numel() == 0) return gi.zero_();
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "resize_backward_cpu",
                                  [&] { resize_backward_linear_cpu<scalar_t>(g, gi); });
  return gi;
}

at::Tensor resize_cpu(const at::Tensor& image, at::IntArrayRef size, int64_t mode) {
  at::Tensor out = prepare_resize(image, size, mode);
  if (out.numel() == 0) return out;
  at::Tensor in = image.contiguous();
  if (mode == kBilinear) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "resize_cpu",
                                    [&] { resize_linear_cpu<scalar_t>(in, out); });
  } else {
    switch (in.element_size()) {
      case 1: resize_nearest_cpu<uint8_t>(in, out); break;
      case 2: resize_nearest_cpu<uint16_t>(in, out); break;
      case 4: resize_nearest_cpu<uint32_t>(in, out); break;
      case 8: resize_nearest_cpu<uint64_t>(in, out); break;
      default: M3D_CHECK(false, "med3d_ext.resize: unsupported element size ", in.element_size());
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) {
  m.impl("resize", &resize_cpu);
  m.impl("resize_backward", &resize_backward_cpu);
}

}  // namespace rs
}  // namespace med3d_ext
