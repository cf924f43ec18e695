// Affine resampling, resizing and the augmentation epilogue, shared by CPU and CUDA.
//
//   affine_resample(image, theta, size, mode, padding_mode, align_corners) -> out
//     image  (N, C, ID, IH, IW), any dtype for mode=nearest (values are copied bit for bit),
//            float32/float64/bfloat16/float16 for mode=bilinear (trilinear)
//     theta  (N, 3, 4) floating; maps an output voxel's normalised coordinate (x, y, z, 1) to the
//            normalised input coordinate, exactly as F.affine_grid
//     size   (N, C, D, H, W) like F.affine_grid's size; out is (N, C, D, H, W), image's dtype
//     == F.grid_sample(image, F.affine_grid(theta, size, align_corners), mode, padding_mode,
//                      align_corners), without the grid tensor.
//
//   affine_resample_pair(image, label, theta, size, label_size, elastic, intensity, seed,
//                        padding_mode, align_corners) -> (image_out, label_out)
//     image      (N, C, ID, IH, IW) floating, sampled trilinearly onto size (N, C, D, H, W)
//     label      (N, 1, LD, LH, LW) any dtype, sampled nearest onto (N, 1, *label_size)
//     elastic    (N, 3, ED, EH, EW) or undefined: displacement (x, y, z) in normalised units,
//                interpolated at output index i of an axis of S voxels at coarse position
//                i * (E - 1) / (S - 1) (== F.interpolate(..., trilinear, align_corners=True))
//                and added to the affine-mapped normalised coordinate
//     intensity  (N, 6) float32 or undefined: scale, shift, gamma, noise_std, clip_min, clip_max
//     seed       (N,) int64 (noise key) or undefined
//     The image epilogue is v -> sign(v)|v|^gamma -> v*scale + shift -> + noise_std * z -> clip,
//     z a standard normal from a counter-based hash of (seed, sample, voxel) (see noise_normal).
//
//   resize(image, size, mode) -> out: == F.interpolate(image, size, mode, align_corners=False)
//     for mode trilinear (floating) and nearest (any dtype).
//
// Files: this header (coordinates, taps, resize indices), intensity.h (noise hash and epilogue),
// resample_voxel.h (one output voxel of the pair kernel), resample_args.h (host checks and type
// dispatch), resample_cpu.cpp / resample_cuda.cu (loops and launches).
//
// Coordinates are computed in T = float (double for float64 images), as grid_sample does in the
// grid's dtype. The formulas follow ATen's GridSampler.h (unnormalise, clip, reflect, nearbyint
// rounding half to even) and UpSample.h, so results agree to float rounding.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "../common/macros.h"

#if defined(__CUDACC__)
#define M3D_UNROLL _Pragma("unroll")
#define M3D_RS_INLINE
#elif defined(__clang__)
#define M3D_UNROLL _Pragma("unroll")
#define M3D_RS_INLINE __attribute__((always_inline))
#else
#define M3D_UNROLL _Pragma("GCC unroll 8")
// The host compiler otherwise keeps these per-voxel helpers out of line (and, in a -fPIC module,
// calls them through the PLT) inside the innermost loop.
#define M3D_RS_INLINE __attribute__((always_inline))
#endif

namespace med3d_ext {
namespace rs {

enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };
enum Mode : int { kBilinear = 0, kNearest = 1 };
constexpr int kIntensityFields = 6;  // scale, shift, gamma, noise_std, clip_min, clip_max

// Overloads that resolve to the same libm / CUDA math function on host and device.
// On the host, floor and nearbyint are libm calls unless the target has SSE4.1, and they sit in
// the innermost loop; the branch-light versions below give the same results for every finite
// value (|x| >= 2^52 / 2^23 is already integral; adding 1.5 * 2^52 or 2^23 rounds half to even
// in the default rounding mode, exactly like nearbyint).
#if defined(__CUDA_ARCH__)
M3D_HOST_DEVICE M3D_RS_INLINE float m_floor(float x) { return floorf(x); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_floor(double x) { return floor(x); }
M3D_HOST_DEVICE M3D_RS_INLINE float m_rint(float x) { return nearbyintf(x); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_rint(double x) { return nearbyint(x); }
#else
template <typename T>
inline M3D_RS_INLINE T m_floor(T x) {
  if (!(x > T(-4.0e15) && x < T(4.0e15))) return x == x ? floor(x) : x;
  const T t = static_cast<T>(static_cast<int64_t>(x));
  return t > x ? t - T(1) : t;
}
inline M3D_RS_INLINE float m_rint(float x) {
  if (!(fabsf(x) < 4194304.0f)) return nearbyintf(x);
  const float b = 12582912.0f;  // IEEE arithmetic: the compiler may not fold (x + b) - b
  return (x + b) - b;
}
inline M3D_RS_INLINE double m_rint(double x) {
  if (!(fabs(x) < 2251799813685248.0)) return nearbyint(x);
  const double b = 6755399441055744.0;
  return (x + b) - b;
}
#endif
M3D_HOST_DEVICE M3D_RS_INLINE float m_abs(float x) { return fabsf(x); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_abs(double x) { return fabs(x); }
M3D_HOST_DEVICE M3D_RS_INLINE float m_fmod(float x, float y) { return fmodf(x, y); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_fmod(double x, double y) { return fmod(x, y); }
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T m_min(T a, T b) { return a < b ? a : b; }
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T m_max(T a, T b) { return a > b ? a : b; }

// floor(x) as an integer for |x| well inside the int64 range (callers clamp first).
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE int64_t floor_small(T x) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(m_floor(x));
#else
  const int64_t i = static_cast<int64_t>(x);  // truncation; one less for negative fractions
  return i - static_cast<int64_t>(static_cast<T>(i) > x);
#endif
}

// ----------------------------------------------------------------- coordinates (GridSampler.h)

// Normalised coordinate of output voxel i of S, computed like F.affine_grid's base grid:
// at::linspace(-1, 1, S) (from both ends, meeting halfway), then * (S - 1) / S unless
// align_corners; 0 when S == 1. Following the same steps matters at rounding ties of nearest
// sampling (e.g. a 4x smaller label grid puts every sample exactly halfway between voxels);
// ATen's vectorised linspace still differs in the last bit for some i, so ties can differ.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T base_coord(int64_t i, int64_t S, bool align) {
  if (S <= 1) return T(0);
  const T step = T(2) / T(S - 1);
  T v = i < S / 2 ? T(-1) + step * T(i) : T(1) - step * T(S - i - 1);
  if (!align) v = (v * T(S - 1)) / T(S);
  return v;
}

template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T reflect(T in, int64_t twice_low, int64_t twice_high) {
  if (twice_low == twice_high) return T(0);
  const T lo = T(twice_low) / 2, span = T(twice_high - twice_low) / 2;
  in = m_abs(in - lo);
  const T extra = m_fmod(in, span);
  const int flips = static_cast<int>(m_floor(in / span));
  return (flips % 2 == 0) ? extra + lo : span - extra + lo;
}

// Normalised coordinate -> padded source index along an axis of `size` voxels.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T source_index(T c, int64_t size, int pad, bool align) {
  c = align ? ((c + 1) / 2) * T(size - 1) : ((c + 1) * T(size) - 1) / 2;
  if (pad == kBorder) {
    c = m_min(T(size - 1), m_max(c, T(0)));
  } else if (pad == kReflection) {
    c = align ? reflect(c, 0, 2 * (size - 1)) : reflect(c, -1, 2 * size - 1);
    c = m_min(T(size - 1), m_max(c, T(0)));
  }
  return c;
}

// Linear interpolation position along one axis (UpSample.h: guard_index_and_lambda).
template <typename T>
struct Lerp {
  int64_t i0, i1;
  T l0, l1;
};

template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE Lerp<T> make_lerp(T src, int64_t in) {
  Lerp<T> r;
  r.i0 = m_min<int64_t>(static_cast<int64_t>(m_floor(src)), in - 1);
  r.l1 = m_min(m_max(src - T(r.i0), T(0)), T(1));
  r.l0 = T(1) - r.l1;
  r.i1 = r.i0 + (r.i0 < in - 1 ? 1 : 0);
  return r;
}

// Coarse elastic position of output index i of S along an axis of E control points
// (F.interpolate(..., align_corners=True)).
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE Lerp<T> elastic_lerp(int64_t i, int64_t S, int64_t E) {
  return make_lerp(S > 1 ? T(E - 1) / T(S - 1) * T(i) : T(0), E);
}

// One displacement component interpolated along z and y at coarse column x; p points at the
// component's (ED, EH, EW) block. The x interpolation comes last, so a CPU row can tabulate
// this per column and stay bit-identical to add_elastic.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T elastic_zy(const T* p, const Lerp<T>& lz, const Lerp<T>& ly,
                                           int64_t EH, int64_t EW, int64_t x) {
  return lz.l0 * (ly.l0 * p[(lz.i0 * EH + ly.i0) * EW + x] + ly.l1 * p[(lz.i0 * EH + ly.i1) * EW + x]) +
         lz.l1 * (ly.l0 * p[(lz.i1 * EH + ly.i0) * EW + x] + ly.l1 * p[(lz.i1 * EH + ly.i1) * EW + x]);
}

// Displacement of the coarse elastic field at output voxel (d, h, w) of (D, H, W), added to g.
// e points at sample n's (3, ED, EH, EW) block, contiguous.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE void add_elastic(const T* e, int64_t ED, int64_t EH, int64_t EW,
                                               int64_t d, int64_t h, int64_t w, int64_t D,
                                               int64_t H, int64_t W, T& gx, T& gy, T& gz) {
  const Lerp<T> lz = elastic_lerp<T>(d, D, ED), ly = elastic_lerp<T>(h, H, EH),
                lx = elastic_lerp<T>(w, W, EW);
  const int64_t S = ED * EH * EW;
  T out[3];
  for (int k = 0; k < 3; ++k)
    out[k] = lx.l0 * elastic_zy(e + k * S, lz, ly, EH, EW, lx.i0) +
             lx.l1 * elastic_zy(e + k * S, lz, ly, EH, EW, lx.i1);
  gx += out[0];
  gy += out[1];
  gz += out[2];
}

// ---------------------------------------------------------------------------- sampling

// The 8 trilinear taps of one source point: offsets into a (ID, IH, IW) volume and weights.
// Taps outside the volume (zeros padding) get weight 0 and offset 0, so the channel loop needs
// no branch. Corner order and weight products follow grid_sample (tnw, tne, tsw, tse, bnw, ...).
template <typename T, typename index_t>
struct Taps {
  index_t off[8];
  T w[8];
};

template <typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE Taps<T, index_t> trilinear_taps(T ix, T iy, T iz, int64_t ID,
                                                              int64_t IH, int64_t IW) {
  // Taps more than one voxel outside the volume are all invalid, so clamping the point to
  // [-2, size + 1] changes nothing and keeps the integer math small (index_t: 32-bit on the GPU
  // whenever a sample fits) and branch-free.
  ix = m_min(m_max(ix, T(-2)), T(IW + 1));
  iy = m_min(m_max(iy, T(-2)), T(IH + 1));
  iz = m_min(m_max(iz, T(-2)), T(ID + 1));
  const index_t x0 = static_cast<index_t>(floor_small(ix)),
                y0 = static_cast<index_t>(floor_small(iy)),
                z0 = static_cast<index_t>(floor_small(iz));
  const T fx = static_cast<T>(x0), fy = static_cast<T>(y0), fz = static_cast<T>(z0);
  const T ex = fx + 1 - ix, ox = ix - fx;  // weights toward x0 and x0 + 1
  const T ey = fy + 1 - iy, oy = iy - fy;
  const T ez = fz + 1 - iz, oz = iz - fz;
  const index_t W = static_cast<index_t>(IW), H = static_cast<index_t>(IH);
  Taps<T, index_t> t;
  if (x0 >= 0 && x0 < W - 1 && y0 >= 0 && y0 < H - 1 && z0 >= 0 && z0 < static_cast<index_t>(ID) - 1) {
    // Interior (the common case): the 8 taps are fixed offsets from one base.
    const index_t base = (z0 * H + y0) * W + x0, HW = H * W;
    const index_t step[8] = {0, 1, W, W + 1, HW, HW + 1, HW + W, HW + W + 1};
    const T wx[2] = {ex, ox}, wy[2] = {ey, oy}, wz[2] = {ez, oz};
    M3D_UNROLL
    for (int k = 0; k < 8; ++k) {
      t.w[k] = (wx[k & 1] * wy[(k >> 1) & 1]) * wz[k >> 2];
      t.off[k] = base + step[k];
    }
    return t;
  }
  // Elsewhere an invalid neighbour gets weight 0 and a clamped (valid, unused) index, so every
  // tap is still a plain load.
  auto axis = [](index_t i0, T e, T o, index_t n, index_t* idx, T* w) {
    const bool v0 = i0 >= 0 && i0 < n, v1 = i0 + 1 >= 0 && i0 + 1 < n;
    w[0] = v0 ? e : T(0);
    w[1] = v1 ? o : T(0);
    idx[0] = m_min(m_max(i0, index_t(0)), n - 1);
    idx[1] = m_min(m_max(i0 + 1, index_t(0)), n - 1);
  };
  index_t xi[2], yi[2], zi[2];
  T wx[2], wy[2], wz[2];
  axis(x0, ex, ox, W, xi, wx);
  axis(y0, ey, oy, H, yi, wy);
  axis(z0, ez, oz, static_cast<index_t>(ID), zi, wz);
  const index_t zo[2] = {zi[0] * H * W, zi[1] * H * W};
  const index_t yo[2] = {yi[0] * W, yi[1] * W};
  M3D_UNROLL
  for (int k = 0; k < 8; ++k) {
    const int dz = k >> 2, dy = (k >> 1) & 1, dx = k & 1;
    t.w[k] = (wx[dx] * wy[dy]) * wz[dz];
    t.off[k] = zo[dz] + yo[dy] + xi[dx];
  }
  return t;
}

// Pairwise sum: grid_sample adds the 8 products in sequence; a tree of depth 3 gives the same
// value to rounding and removes a 7-add dependency chain from every voxel.
template <typename scalar_t, typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE T apply_taps(const scalar_t* p, const Taps<T, index_t>& t) {
  T v[8];
  M3D_UNROLL
  for (int k = 0; k < 8; ++k) v[k] = static_cast<T>(p[t.off[k]]) * t.w[k];
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Offset of the nearest source voxel, or -1 outside the volume (zeros padding).
template <typename T, typename index_t>
M3D_HOST_DEVICE M3D_RS_INLINE index_t nearest_offset(T ix, T iy, T iz, int64_t ID, int64_t IH,
                                                    int64_t IW) {
  // Clamping to [-2, size + 1] keeps the conversion defined and changes no in/out decision.
  ix = m_min(m_max(ix, T(-2)), T(IW + 1));
  iy = m_min(m_max(iy, T(-2)), T(IH + 1));
  iz = m_min(m_max(iz, T(-2)), T(ID + 1));
  const index_t x = static_cast<index_t>(m_rint(ix)), y = static_cast<index_t>(m_rint(iy)),
                z = static_cast<index_t>(m_rint(iz));
  const index_t W = static_cast<index_t>(IW), H = static_cast<index_t>(IH);
  if (x < 0 || x >= W || y < 0 || y >= H || z < 0 || z >= static_cast<index_t>(ID))
    return index_t(-1);
  return (z * H + y) * W + x;
}

// F.interpolate(mode="nearest") source index (UpSample.h nearest_idx, float scale).
M3D_HOST_DEVICE M3D_RS_INLINE int64_t resize_nearest(int64_t i, int64_t in, int64_t out) {
  if (in == out) return i;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  return m_min<int64_t>(static_cast<int64_t>(floorf(static_cast<float>(i) * scale)), in - 1);
}

// F.interpolate(mode="trilinear", align_corners=False) taps along one axis.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE Lerp<T> resize_linear(int64_t i, int64_t in, int64_t out) {
  const T scale = T(in) / T(out);
  T src = scale * (T(i) + T(0.5)) - T(0.5);
  src = src < T(0) ? T(0) : src;
  return make_lerp(src, in);
}

// ------------------------------------------------------------------------- entry points

at::Tensor affine_resample_cpu(const at::Tensor& image, const at::Tensor& theta,
                               at::IntArrayRef size, int64_t mode, int64_t padding_mode,
                               bool align_corners);
std::tuple<at::Tensor, at::Tensor> affine_resample_pair_cpu(
    const at::Tensor& image, const at::Tensor& label, const at::Tensor& theta,
    at::IntArrayRef size, at::IntArrayRef label_size, const std::optional<at::Tensor>& elastic,
    const std::optional<at::Tensor>& intensity, const std::optional<at::Tensor>& seed,
    int64_t padding_mode, bool align_corners);
at::Tensor resize_cpu(const at::Tensor& image, at::IntArrayRef size, int64_t mode);

}  // namespace rs
}  // namespace med3d_ext
