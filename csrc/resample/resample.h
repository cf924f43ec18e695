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
#define M3D_RS_INLINE
#else
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
// On the host, floor is a libm call unless the target has SSE4.1; the branch-light version below
// gives the same result for every finite value.
#if defined(__CUDA_ARCH__)
M3D_HOST_DEVICE M3D_RS_INLINE float m_floor(float x) { return floorf(x); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_floor(double x) { return floor(x); }
#else
template <typename T>
inline M3D_RS_INLINE T m_floor(T x) {
  if (!(x > T(-4.0e15) && x < T(4.0e15))) return x == x ? floor(x) : x;
  const T t = static_cast<T>(static_cast<int64_t>(x));
  return t > x ? t - T(1) : t;
}
#endif
M3D_HOST_DEVICE M3D_RS_INLINE float m_abs(float x) { return fabsf(x); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_abs(double x) { return fabs(x); }
M3D_HOST_DEVICE M3D_RS_INLINE float m_fmod(float x, float y) { return fmodf(x, y); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_fmod(double x, double y) { return fmod(x, y); }
// a * b rounded on its own on both devices: nvcc contracts a * b + c into one FMA by default
// (one rounding instead of two), and the CPU build has no FMA (resample_cpu.cpp), so the
// sampling coordinates, and with them nearest-neighbour ties, would differ between the devices
// (an identity theta onto a 2x or 4x smaller label grid puts every sample exactly on a tie).
#if defined(__CUDA_ARCH__)
M3D_HOST_DEVICE M3D_RS_INLINE float m_mul(float a, float b) { return __fmul_rn(a, b); }
M3D_HOST_DEVICE M3D_RS_INLINE double m_mul(double a, double b) { return __dmul_rn(a, b); }
#else
template <typename T>
inline M3D_RS_INLINE T m_mul(T a, T b) { return a * b; }
#endif
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T m_min(T a, T b) { return a < b ? a : b; }
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T m_max(T a, T b) { return a > b ? a : b; }

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
  T v = i < S / 2 ? T(-1) + m_mul(step, T(i)) : T(1) - m_mul(step, T(S - i - 1));
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

// Clamp a source index to [0, size - 1] as ATen's clip_coordinates does, comparison for
// comparison, so that a NaN (a non-finite theta) lands where grid_sample puts it on the same
// device. ATen's CPU code, std::min(size - 1, std::max(c, 0)), sends NaN to size - 1; its CUDA
// code, ::min(size - 1, ::max(c, 0)), is fminf/fmaxf there, which drop the NaN: it lands on 0.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T clip_index(T c, int64_t size) {
#if defined(__CUDA_ARCH__)
  c = c > T(0) ? c : T(0);  // fmaxf(c, 0): NaN -> 0
#else
  c = c < T(0) ? T(0) : c;  // std::max(c, 0): NaN stays NaN, and std::min then gives size - 1
#endif
  return c < T(size - 1) ? c : T(size - 1);
}

// Normalised coordinate -> padded source index along an axis of `size` voxels.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T source_index(T c, int64_t size, int pad, bool align) {
  c = align ? ((c + 1) / 2) * T(size - 1) : (m_mul(c + 1, T(size)) - 1) / 2;
  if (pad == kBorder) {
    c = clip_index(c, size);
  } else if (pad == kReflection) {
    c = align ? reflect(c, 0, 2 * (size - 1)) : reflect(c, -1, 2 * size - 1);
    c = clip_index(c, size);
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
//
// Per axis, a padded source index c becomes two taps (i0 = floor(c), i1 = i0 + 1) with weights
// toward each (grid_sample's ix_tse - ix and ix - ix_tnw). Everything is branch-free so that the
// CPU can evaluate a block of voxels as one vectorised loop and a GPU thread has no divergence:
// an out-of-range tap gets weight 0 and a clamped (valid, unused) index, so every tap is a plain
// load. Clamping c to [-2, n + 1] first changes no in/out decision and keeps the integer math in
// 32 bits (callers guarantee n < 2^30).

// floor(c) as int32 for c in [-2, n + 1] (truncation, one less for negative fractions).
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE int32_t floor_i32(T c) {
  const int32_t t = static_cast<int32_t>(c);
  return t - static_cast<int32_t>(static_cast<T>(t) > c);
}

template <typename T>
struct AxisTap {
  int32_t i0, i1;  // clamped into [0, n)
  T w0, w1;        // 0 for a tap outside [0, n)
};

// (Validity as unsigned compares and 0/1 factors: plain selects and && make the host compiler
// emit branches, which stops it from vectorising the loop over a block of voxels.)
M3D_HOST_DEVICE M3D_RS_INLINE bool in_range(int32_t i, int32_t n) {
  return static_cast<uint32_t>(i) < static_cast<uint32_t>(n);
}

template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE AxisTap<T> axis_tap(T c, int32_t n) {
  c = m_min(m_max(c, T(-2)), T(n + 1));
  const int32_t f = floor_i32(c);
  const T ff = static_cast<T>(f);
  AxisTap<T> r;
  r.w0 = ((ff + T(1)) - c) * static_cast<T>(static_cast<int32_t>(in_range(f, n)));
  r.w1 = (c - ff) * static_cast<T>(static_cast<int32_t>(in_range(f + 1, n)));
  r.i0 = m_min(m_max(f, 0), n - 1);
  r.i1 = m_min(m_max(f + 1, 0), n - 1);
  return r;
}

// f rounded half to even from f + r (0 <= r < 1): grid_sample's nearbyint.
M3D_HOST_DEVICE M3D_RS_INLINE int32_t round_half_even(int32_t f, bool above_half, bool at_half) {
  return f + (static_cast<int32_t>(above_half) | (static_cast<int32_t>(at_half) & f));
}

// Nearest source index (round half to even, like grid_sample's nearbyint), or -1 outside [0, n).
// c - floor(c) is exact for c in [-2, n + 1] (Sterbenz), so the tie test is exact too.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE int32_t axis_nearest(T c, int32_t n) {
  c = m_min(m_max(c, T(-2)), T(n + 1));
  const int32_t f = floor_i32(c);
  const T r = c - static_cast<T>(f);
  const int32_t i = round_half_even(f, r > T(0.5), r == T(0.5));
  return i | (static_cast<int32_t>(in_range(i, n)) - 1);  // -1 when outside
}

// The interior of the input, where most points of an augmented patch fall: on every axis
// 0 <= c < n - 1, so both taps are inside, floor is truncation and i1 = i0 + 1 (false for NaN).
// (c < T(n - 1) is exact enough: where n - 1 is not representable, the floats below its rounding
// are below n - 1.)
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE bool axis_interior(T c, int32_t n) {
  return (c >= T(0)) & (c < static_cast<T>(n - 1));  // & not &&: predicate logic, no branch
}

// axis_tap and axis_nearest for an interior c (axis_interior): the same values bit for bit
// (axis_tap's validity factors are 1 there and its clamps change nothing), without the
// instructions the border needs. The CUDA kPlain kernel's common path.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE AxisTap<T> interior_axis_tap(T c) {
  const int32_t f = static_cast<int32_t>(c);
  const T ff = static_cast<T>(f);
  return {f, f + 1, (ff + T(1)) - c, c - ff};
}

// For an interior c, axis_nearest(c, n) is c rounded to the nearest integer, half to even: the
// default IEEE rounding, one conversion instruction on the GPU.
#if defined(__CUDA_ARCH__)
M3D_HOST_DEVICE M3D_RS_INLINE int32_t interior_axis_nearest(float c) { return __float2int_rn(c); }
M3D_HOST_DEVICE M3D_RS_INLINE int32_t interior_axis_nearest(double c) { return __double2int_rn(c); }
#else
template <typename T>
inline M3D_RS_INLINE int32_t interior_axis_nearest(T c) {
  return static_cast<int32_t>(std::nearbyint(c));  // the default rounding mode: half to even
}
#endif

// The 8 trilinear weights in grid_sample's corner order (k = 4 dz + 2 dy + dx) and products
// ((wx * wy) * wz).
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T tap_weight(const AxisTap<T>& x, const AxisTap<T>& y,
                                           const AxisTap<T>& z, int k) {
  return ((k & 1 ? x.w1 : x.w0) * ((k >> 1) & 1 ? y.w1 : y.w0)) * (k >> 2 ? z.w1 : z.w0);
}

// Sum of the 8 weighted taps: grid_sample adds them in sequence; a tree of depth 3 gives the
// same value to rounding and removes a 7-add dependency chain from every voxel.
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T sum8(const T* v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
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

// Backward of the trilinear resize as a gather, the same on both devices: input voxel i
// receives the output gradients whose forward taps (resize_linear) include it, each weighted
// as the forward weighted it, summed in a fixed order (so the result is bitwise reproducible,
// unlike an atomic scatter). Along an axis those outputs have i0 or i1 equal to i, i.e. a
// source coordinate in [i - 1, i + 1]: resize_candidates gives that range of outputs with one
// of margin each side (the exact test is the weight, resize_grad_weight, which is 0 outside).
M3D_HOST_DEVICE M3D_RS_INLINE void resize_candidates(int64_t i, int64_t in, int64_t out,
                                                     int64_t* lo, int64_t* hi) {
  const double s = static_cast<double>(in) / static_cast<double>(out);
  const int64_t a = static_cast<int64_t>(floor((static_cast<double>(i) - 0.5) / s - 0.5)) - 1;
  const int64_t b = static_cast<int64_t>(ceil((static_cast<double>(i) + 1.5) / s - 0.5)) + 1;
  *lo = a < 0 ? 0 : a;
  *hi = b > out - 1 ? out - 1 : b;
}

// How much output o's value took from input i along one axis (both taps may be i at the edge).
template <typename T>
M3D_HOST_DEVICE M3D_RS_INLINE T resize_grad_weight(int64_t o, int64_t i, int64_t in, int64_t out) {
  const Lerp<T> l = resize_linear<T>(o, in, out);
  return (l.i0 == i ? l.l0 : T(0)) + (l.i1 == i ? l.l1 : T(0));
}

// d grad_in[d, h, w] for one (n, c) block: g points at that block of the output gradient
// (D, H, W contiguous); sizes in (ID, IH, IW) and out (D, H, W). Outputs along W are taken in
// chunks of kResizeChunk whose weights are computed once per (d, h) row pair.
constexpr int kResizeChunk = 16;

template <typename T, typename scalar_t>
M3D_HOST_DEVICE M3D_RS_INLINE T resize_grad_at(const scalar_t* g, int64_t d, int64_t h, int64_t w,
                                               int64_t ID, int64_t IH, int64_t IW, int64_t D,
                                               int64_t H, int64_t W) {
  int64_t d0, d1, h0, h1, w0, w1;
  resize_candidates(d, ID, D, &d0, &d1);
  resize_candidates(h, IH, H, &h0, &h1);
  resize_candidates(w, IW, W, &w0, &w1);
  T acc = T(0);
  for (int64_t c0 = w0; c0 <= w1; c0 += kResizeChunk) {
    T ww[kResizeChunk];
    const int n = static_cast<int>(w1 - c0 + 1 < kResizeChunk ? w1 - c0 + 1 : kResizeChunk);
    for (int k = 0; k < n; ++k) ww[k] = resize_grad_weight<T>(c0 + k, w, IW, W);
    for (int64_t od = d0; od <= d1; ++od) {
      const T wd = resize_grad_weight<T>(od, d, ID, D);
      if (wd == T(0)) continue;
      for (int64_t oh = h0; oh <= h1; ++oh) {
        const T wdh = wd * resize_grad_weight<T>(oh, h, IH, H);
        if (wdh == T(0)) continue;
        const scalar_t* row = g + (od * H + oh) * W + c0;
        T s = T(0);
        for (int k = 0; k < n; ++k) s += ww[k] * static_cast<T>(row[k]);
        acc += wdh * s;
      }
    }
  }
  return acc;
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
at::Tensor resize_backward_cpu(const at::Tensor& grad, at::IntArrayRef input_size);

}  // namespace rs
}  // namespace med3d_ext
