// The per-voxel work of the resample kernels (one output voxel: sampling point, all channels,
// epilogue, fused label), written once for resample_cpu.cpp and resample_cuda.cu.
#pragma once

#include "intensity.h"
#include "resample.h"

namespace med3d_ext {
namespace rs {

// ------------------------------------------------------------------------- per voxel

// Everything one launch needs, as raw pointers (contiguous tensors). The "image" is sampled
// trilinearly with the intensity epilogue; the "label" nearest, copied as raw bits (label_t is
// an unsigned integer of the element's size). Either may be absent (nullptr). One of the two
// single-tensor ops is this with the other part absent.
template <typename scalar_t, typename label_t, typename T>
struct PairArgs {
  using scalar_type = scalar_t;
  using label_type = label_t;
  using coord_type = T;
  const scalar_t* image = nullptr;
  scalar_t* image_out = nullptr;
  int64_t C = 0, D = 0, H = 0, W = 0, ID = 0, IH = 0, IW = 0;        // image grids
  const label_t* label = nullptr;
  label_t* label_out = nullptr;
  int64_t LC = 0, LD = 0, LH = 0, LW = 0, LID = 0, LIH = 0, LIW = 0;  // label grids
  bool fused = false;  // same output grid and input size: the label reuses the image's point
  const T* theta = nullptr;    // (N, 12)
  const T* elastic = nullptr;  // (N, 3, ED, EH, EW)
  int64_t ED = 0, EH = 0, EW = 0;
  const float* intensity = nullptr;  // (N, kIntensityFields)
  const int64_t* seed = nullptr;     // (N,)
  int pad = kZeros;
  bool align = false;
};

// Normalised sampling point of output voxel (d, h, w) of the (D, H, W) grid of sample n.
template <typename scalar_t, typename label_t, typename T>
M3D_HOST_DEVICE M3D_RS_INLINE void sample_point(const PairArgs<scalar_t, label_t, T>& a, int64_t n, int64_t d,
                                  int64_t h, int64_t w, int64_t D, int64_t H, int64_t W, T bx,
                                  T by, T bz, T& gx, T& gy, T& gz) {
  const T* t = a.theta + n * 12;
  // x term last: a CPU row hoists the rest (see resample_cpu.cpp) with the same rounding.
  gx = t[0] * bx + ((t[1] * by + t[2] * bz) + t[3]);
  gy = t[4] * bx + ((t[5] * by + t[6] * bz) + t[7]);
  gz = t[8] * bx + ((t[9] * by + t[10] * bz) + t[11]);
  if (a.elastic != nullptr)
    add_elastic(a.elastic + n * 3 * a.ED * a.EH * a.EW, a.ED, a.EH, a.EW, d, h, w, D, H, W, gx,
                gy, gz);
}

// Nearest copy of every label channel at source point (ix, iy, iz); o = spatial output offset.
template <typename scalar_t, typename label_t, typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE void label_at(const PairArgs<scalar_t, label_t, T>& a, int64_t n, index_t o,
                              T ix, T iy, T iz) {
  const index_t in_cs = static_cast<index_t>(a.LID * a.LIH * a.LIW);
  const index_t out_cs = static_cast<index_t>(a.LD * a.LH * a.LW);
  const label_t* in = a.label + n * a.LC * in_cs;
  label_t* out = a.label_out + n * a.LC * out_cs;
  const index_t src = nearest_offset<T, index_t>(ix, iy, iz, a.LID, a.LIH, a.LIW);
  for (int64_t c = 0; c < a.LC; ++c)
    out[c * out_cs + o] = src < 0 ? label_t(0) : in[c * in_cs + src];
}

// One image output voxel (all channels, epilogue) at normalised point g and, when fused, its
// label voxel; o = spatial output offset. pad / align / has_intensity / fused are passed
// explicitly so that a caller with compile-time values gets a branch-free inlined body.
template <typename scalar_t, typename label_t, typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE void image_at(const PairArgs<scalar_t, label_t, T>& a, int64_t n,
                                            index_t o, T gx, T gy, T gz, int pad, bool align,
                                            bool has_intensity, bool fused) {
  const T ix = source_index(gx, a.IW, pad, align), iy = source_index(gy, a.IH, pad, align),
          iz = source_index(gz, a.ID, pad, align);
  const index_t in_cs = static_cast<index_t>(a.ID * a.IH * a.IW);
  const index_t out_cs = static_cast<index_t>(a.D * a.H * a.W);
  const scalar_t* in = a.image + n * a.C * in_cs;
  scalar_t* out = a.image_out + n * a.C * out_cs;
  const Taps<T, index_t> taps = trilinear_taps<T, index_t>(ix, iy, iz, a.ID, a.IH, a.IW);
  if (has_intensity) {
    const float* p = a.intensity + n * kIntensityFields;
    const uint32_t key = noise_key(a.seed != nullptr ? a.seed[n] : 0, n);
    for (int64_t c = 0; c < a.C; ++c) {
      const float v = static_cast<float>(apply_taps(in + c * in_cs, taps));
      out[c * out_cs + o] = static_cast<scalar_t>(intensity(v, p, key, c * out_cs + o));
    }
  } else {
    for (int64_t c = 0; c < a.C; ++c)
      out[c * out_cs + o] = static_cast<scalar_t>(apply_taps(in + c * in_cs, taps));
  }
  if (fused) label_at<scalar_t, label_t, T, index_t>(a, n, o, ix, iy, iz);
}

template <typename scalar_t, typename label_t, typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE void image_voxel(const PairArgs<scalar_t, label_t, T>& a,
                                               int64_t n, int64_t d, int64_t h, int64_t w, T bx,
                                               T by, T bz) {
  T gx, gy, gz;
  sample_point(a, n, d, h, w, a.D, a.H, a.W, bx, by, bz, gx, gy, gz);
  image_at<scalar_t, label_t, T, index_t>(a, n, static_cast<index_t>((d * a.H + h) * a.W + w),
                                          gx, gy, gz, a.pad, a.align, a.intensity != nullptr,
                                          a.fused && a.label != nullptr);
}

// One label output voxel on the label's own grid.
template <typename scalar_t, typename label_t, typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE void label_voxel(const PairArgs<scalar_t, label_t, T>& a, int64_t n, int64_t d,
                                 int64_t h, int64_t w, T bx, T by, T bz) {
  T gx, gy, gz;
  sample_point(a, n, d, h, w, a.LD, a.LH, a.LW, bx, by, bz, gx, gy, gz);
  const T ix = source_index(gx, a.LIW, a.pad, a.align),
          iy = source_index(gy, a.LIH, a.pad, a.align),
          iz = source_index(gz, a.LID, a.pad, a.align);
  label_at<scalar_t, label_t, T, index_t>(a, n, static_cast<index_t>((d * a.LH + h) * a.LW + w),
                                          ix, iy, iz);
}

}  // namespace rs
}  // namespace med3d_ext
