// CPU kernels for affine_resample, affine_resample_pair and resize (see resample.h).
//
// Work is split over output rows (sample, depth, height) with at::parallel_for; the inner loop
// walks W with the row's part of the affine map fixed and a precomputed table of the base
// x-coordinates, so no grid tensor is ever formed. (ATen's 3-D grid_sample parallelises over
// the batch only, which leaves all but one core idle for a single volume.)
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

template <typename T>
std::vector<T> base_table(int64_t S, bool align) {
  std::vector<T> v(S);
  for (int64_t i = 0; i < S; ++i) v[i] = base_coord<T>(i, S, align);
  return v;
}

// Image rows with the padding mode as a compile-time constant (it selects the clipping code in
// the innermost loop). Per row: the theta terms of y and z are hoisted, and the elastic field is
// interpolated along z and y once per coarse column; per voxel only the x terms remain.
template <int kPad, typename scalar_t, typename label_t, typename T, typename index_t>
void image_rows(const PairArgs<scalar_t, label_t, T>& a, int64_t N) {
  const auto bx = base_table<T>(a.W, a.align), by = base_table<T>(a.H, a.align),
             bz = base_table<T>(a.D, a.align);
  const bool elastic = a.elastic != nullptr, inten = a.intensity != nullptr;
  const bool fused = a.fused && a.label != nullptr;
  std::vector<Lerp<T>> ex(elastic ? a.W : 0);
  for (int64_t w = 0; w < (elastic ? a.W : 0); ++w) ex[w] = elastic_lerp<T>(w, a.W, a.EW);
  const int64_t ES = a.ED * a.EH * a.EW;
  at::parallel_for(0, N * a.D * a.H, row_grain(a.W), [&](int64_t r0, int64_t r1) {
    // A private copy: no output store (label stores are char-typed and alias anything) can
    // touch it, so its sizes and pointers stay in registers across the voxel loop.
    const PairArgs<scalar_t, label_t, T> la = a;
    std::vector<T> col(elastic ? 3 * a.EW : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % a.H, d = (r / a.H) % a.D, n = r / (a.H * a.D);
      T t[12];
      for (int k = 0; k < 12; ++k) t[k] = a.theta[n * 12 + k];
      const T rx = (t[1] * by[h] + t[2] * bz[d]) + t[3];
      const T ry = (t[5] * by[h] + t[6] * bz[d]) + t[7];
      const T rz = (t[9] * by[h] + t[10] * bz[d]) + t[11];
      if (elastic) {
        const Lerp<T> lz = elastic_lerp<T>(d, a.D, a.ED), ly = elastic_lerp<T>(h, a.H, a.EH);
        const T* e = a.elastic + n * 3 * ES;
        for (int k = 0; k < 3; ++k)
          for (int64_t x = 0; x < a.EW; ++x)
            col[k * a.EW + x] = elastic_zy(e + k * ES, lz, ly, a.EH, a.EW, x);
      }
      const index_t o0 = static_cast<index_t>((d * a.H + h) * a.W);
      for (int64_t w = 0; w < a.W; ++w) {
        T gx = t[0] * bx[w] + rx, gy = t[4] * bx[w] + ry, gz = t[8] * bx[w] + rz;
        if (elastic) {
          const Lerp<T>& lx = ex[w];
          const T* c = col.data();
          gx += lx.l0 * c[lx.i0] + lx.l1 * c[lx.i1];
          gy += lx.l0 * c[a.EW + lx.i0] + lx.l1 * c[a.EW + lx.i1];
          gz += lx.l0 * c[2 * a.EW + lx.i0] + lx.l1 * c[2 * a.EW + lx.i1];
        }
        image_at<scalar_t, label_t, T, index_t>(la, n, o0 + static_cast<index_t>(w), gx, gy, gz,
                                                kPad, a.align, inten, fused);
      }
    }
  });
}

template <typename scalar_t, typename label_t, typename T, typename index_t>
void run_pair(const PairArgs<scalar_t, label_t, T>& a, int64_t N) {
  // scalar_t is an integer placeholder when there is no image (nearest-only calls).
  if constexpr (!std::is_integral_v<scalar_t>) {
    if (a.image != nullptr && N * a.C * a.D * a.H * a.W > 0) {
      switch (a.pad) {
        case kBorder: image_rows<kBorder, scalar_t, label_t, T, index_t>(a, N); break;
        case kReflection: image_rows<kReflection, scalar_t, label_t, T, index_t>(a, N); break;
        default: image_rows<kZeros, scalar_t, label_t, T, index_t>(a, N);
      }
    }
  }
  const bool label_done = a.fused && a.image != nullptr && a.C > 0;
  if (a.label != nullptr && !label_done && N * a.LC * a.LD * a.LH * a.LW > 0) {
    const auto bx = base_table<T>(a.LW, a.align), by = base_table<T>(a.LH, a.align),
               bz = base_table<T>(a.LD, a.align);
    at::parallel_for(0, N * a.LD * a.LH, row_grain(a.LW), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r % a.LH, d = (r / a.LH) % a.LD, n = r / (a.LH * a.LD);
        for (int64_t w = 0; w < a.LW; ++w)
          label_voxel<scalar_t, label_t, T, index_t>(a, n, d, h, w, bx[w], by[h], bz[d]);
      }
    });
  }
}

void run_prepared(const Prepared& p, int64_t N, int64_t pad, bool align) {
  // 64-bit offsets only: on the CPU 32-bit indexing buys nothing and would double the code.
  dispatch_pair(p, pad, align, [&](const auto& args, auto index_tag) {
    using A = std::decay_t<decltype(args)>;
    if constexpr (std::is_same_v<decltype(index_tag), int64_t>)
      run_pair<typename A::scalar_type, typename A::label_type, typename A::coord_type,
               int64_t>(args, N);
    else
      run_pair<typename A::scalar_type, typename A::label_type, typename A::coord_type,
               int64_t>(args, N);
  });
}

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

}  // namespace

at::Tensor affine_resample_cpu(const at::Tensor& image, const at::Tensor& theta,
                               at::IntArrayRef size, int64_t mode, int64_t padding_mode,
                               bool align_corners) {
  Prepared p = prepare_single(image, theta, size, mode, padding_mode);
  run_prepared(p, image.size(0), padding_mode, align_corners);
  return mode == kBilinear ? p.image_out : p.label_out;
}

std::tuple<at::Tensor, at::Tensor> affine_resample_pair_cpu(
    const at::Tensor& image, const at::Tensor& label, const at::Tensor& theta,
    at::IntArrayRef size, at::IntArrayRef label_size, const std::optional<at::Tensor>& elastic,
    const std::optional<at::Tensor>& intensity, const std::optional<at::Tensor>& seed,
    int64_t padding_mode, bool align_corners) {
  Prepared p = prepare_pair(image, label, theta, size, label_size, elastic, intensity, seed,
                            padding_mode);
  run_prepared(p, image.size(0), padding_mode, align_corners);
  return {p.image_out, p.label_out};
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
  m.impl("affine_resample", &affine_resample_cpu);
  m.impl("affine_resample_pair", &affine_resample_pair_cpu);
  m.impl("resize", &resize_cpu);
}

}  // namespace rs
}  // namespace med3d_ext
