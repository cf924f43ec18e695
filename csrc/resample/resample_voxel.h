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

// Row part of the affine map: the y, z and constant terms of output row (d, h) of sample n,
// given the row's base coordinates; a voxel then adds only its x term (theta_x * bx[w]).
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE void row_terms(const T* t, T by, T bz, T r[3]) {
  r[0] = (m_mul(t[1], by) + m_mul(t[2], bz)) + t[3];  // m_mul: no FMA on either device
  r[1] = (m_mul(t[5], by) + m_mul(t[6], bz)) + t[7];
  r[2] = (m_mul(t[9], by) + m_mul(t[10], bz)) + t[11];
}

// Sizes of one input grid as the per-voxel helpers need them (all < 2^30: see check_axes).
template <typename index_t>
struct Grid {
  int32_t D, H, W;
  index_t HW;
};

template <typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE Grid<index_t> make_grid(int64_t D, int64_t H, int64_t W) {
  return {static_cast<int32_t>(D), static_cast<int32_t>(H), static_cast<int32_t>(W),
          static_cast<index_t>(H * W)};
}

// The 8 trilinear taps of one source point: zy[2 dz + dy] (plane + row offset), x[dx], and the
// weights w[4 dz + 2 dy + dx]; tap k reads offset zy[k >> 1] + x[k & 1].
template <typename T, typename index_t>
struct Taps {
  index_t zy[4], x[2];
  T w[8];
};

// The taps of the three axes' (axis_tap or interior_axis_tap) in grid g.
template <typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE Taps<T, index_t> combine_taps(const AxisTap<T>& x,
                                                            const AxisTap<T>& y,
                                                            const AxisTap<T>& z,
                                                            const Grid<index_t>& g) {
  const index_t W = static_cast<index_t>(g.W);
  const index_t z0 = static_cast<index_t>(z.i0) * g.HW, z1 = static_cast<index_t>(z.i1) * g.HW;
  const index_t y0 = static_cast<index_t>(y.i0) * W, y1 = static_cast<index_t>(y.i1) * W;
  Taps<T, index_t> t;
  t.zy[0] = z0 + y0;
  t.zy[1] = z0 + y1;
  t.zy[2] = z1 + y0;
  t.zy[3] = z1 + y1;
  t.x[0] = static_cast<index_t>(x.i0);
  t.x[1] = static_cast<index_t>(x.i1);
  M3D_UNROLL
  for (int k = 0; k < 8; ++k) t.w[k] = tap_weight(x, y, z, k);
  return t;
}

// cx, cy, cz: padded source indices (source_index) in grid g.
template <typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE Taps<T, index_t> trilinear_taps(T cx, T cy, T cz,
                                                              const Grid<index_t>& g) {
  return combine_taps(axis_tap(cx, g.W), axis_tap(cy, g.H), axis_tap(cz, g.D), g);
}

// Every tap of (cx, cy, cz) inside grid g: see axis_interior.
template <typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE bool interior_point(T cx, T cy, T cz, const Grid<index_t>& g) {
  return axis_interior(cx, g.W) & axis_interior(cy, g.H) & axis_interior(cz, g.D);
}

// A plain load; sample_taps' default (the CUDA kPlain kernel passes one through __ldg).
struct PlainLoad {
  template <typename E>
  M3D_HOST_DEVICE E operator()(const E* q) const { return *q; }
};

// Trilinear value of one channel (p: its (D, H, W) block) at taps t.
template <typename scalar_t, typename T, typename index_t, typename Load = PlainLoad>
M3D_HOST_DEVICE M3D_RS_INLINE T sample_taps(const scalar_t* p, const Taps<T, index_t>& t,
                                            Load load = {}) {
  T v[8];
  M3D_UNROLL
  for (int k = 0; k < 8; ++k) v[k] = static_cast<T>(load(p + (t.zy[k >> 1] + t.x[k & 1]))) * t.w[k];
  return sum8(v);
}

// sample_taps for interior taps (interior_axis_tap: t.x[1] == t.x[0] + 1), the same value: the
// two taps of a row load from one pointer (on the GPU, the second at an immediate offset).
template <typename scalar_t, typename T, typename index_t, typename Load = PlainLoad>
M3D_HOST_DEVICE M3D_RS_INLINE T sample_interior_taps(const scalar_t* p, const Taps<T, index_t>& t,
                                                     Load load = {}) {
  T v[8];
  M3D_UNROLL
  for (int k = 0; k < 8; ++k) {
    const scalar_t* row = p + (t.zy[k >> 1] + t.x[0]);
    v[k] = static_cast<T>(load(row + (k & 1))) * t.w[k];
  }
  return sum8(v);
}

// Offset of voxel (x, y, z) in grid g.
template <typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE index_t grid_offset(int32_t x, int32_t y, int32_t z,
                                                  const Grid<index_t>& g) {
  return static_cast<index_t>(z) * g.HW + static_cast<index_t>(y) * g.W + x;
}

// Offset of the nearest source voxel in grid g, or -1 outside it (zeros padding: label 0).
template <typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE index_t nearest_offset(T cx, T cy, T cz, const Grid<index_t>& g) {
  const int32_t x = axis_nearest(cx, g.W), y = axis_nearest(cy, g.H), z = axis_nearest(cz, g.D);
  return grid_offset(x, y, z, g) | -static_cast<index_t>((x | y | z) < 0);  // -1 outside
}

// The image value written for channel c at spatial output offset o: the intensity epilogue
// (p: the sample's parameters, key: its noise key) or a plain cast.
template <typename scalar_t, typename T>
M3D_HOST_DEVICE M3D_RS_INLINE scalar_t epilogue(T v, const float* p, uint32_t key, int64_t idx) {
  return static_cast<scalar_t>(p == nullptr ? v : intensity(static_cast<float>(v), p, key, idx));
}

}  // namespace rs
}  // namespace med3d_ext
