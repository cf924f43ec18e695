// Counter-based Gaussian noise and the intensity epilogue of affine_resample_pair, shared by the
// CPU and CUDA kernels and reproduced bit for bit (up to libm rounding of log/cos/sqrt) by
// med3d_ext.reference.noise_normal / intensity_epilogue in pure PyTorch int64 arithmetic.
#pragma once

#include "resample.h"

namespace med3d_ext {
namespace rs {

// ------------------------------------------------------------------- noise and intensity

// 32-bit integer hash (two multiply-xorshift rounds). Both multipliers are below 2^31, so the
// pure-PyTorch reference can reproduce it in int64 arithmetic without overflow.
M3D_HOST_DEVICE M3D_RS_INLINE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x = static_cast<uint32_t>((static_cast<uint64_t>(x) * 0x21f0aaadull) & 0xffffffffull);
  x ^= x >> 15;
  x = static_cast<uint32_t>((static_cast<uint64_t>(x) * 0x735a2d97ull) & 0xffffffffull);
  x ^= x >> 15;
  return x;
}

// Per-sample noise key from the 64-bit seed and the sample index.
M3D_HOST_DEVICE M3D_RS_INLINE uint32_t noise_key(int64_t seed, int64_t n) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t lo = static_cast<uint32_t>(s & 0xffffffffull), hi = static_cast<uint32_t>(s >> 32);
  return hash32(lo ^ hash32(hi ^ hash32(static_cast<uint32_t>(n))));
}

// A standard normal for voxel `idx` (index within the sample's image, channel included) by
// Box-Muller over two 24-bit uniforms: u1 in (0, 1], u2 in [0, 1).
M3D_HOST_DEVICE M3D_RS_INLINE float noise_normal(uint32_t key, int64_t idx) {
  const uint64_t i = static_cast<uint64_t>(idx);
  const uint32_t ilo = static_cast<uint32_t>(i & 0xffffffffull), ihi = static_cast<uint32_t>(i >> 32);
  const uint32_t a = hash32(key ^ hash32(ilo + hash32(ihi)));
  const uint32_t b = hash32(a ^ 0x68e31da4u);
  const float u1 = static_cast<float>((a >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float u2 = static_cast<float>(b >> 8) * 5.9604644775390625e-08f;
#ifdef __CUDA_ARCH__
  // cospi(2 u2) = cos(2 pi u2) without cosf's range reduction, whose slow path for large
  // arguments (never taken here: the argument is below 2 pi) gave every kernel that inlines
  // this a local-memory stack frame; it differs from the CPU's cosf by rounding only
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
#else
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
#endif
}

// sign(v) |v|^gamma. Out of line on the GPU: powf's code (with its special-case paths) inlined
// into each of a kernel's unrolled voxels made the intensity kernels too large for the
// instruction cache (ncu, H200: 41% of the warps' cycles waiting for instructions), and the
// training CLI never takes this branch (gamma 1).
// (inline: one definition across the translation units that include this header)
#if defined(__CUDACC__)
inline __host__ __device__ __noinline__
#else
inline
#endif
float signed_pow(float v, float gamma) {
  const float m = powf(fabsf(v), gamma);
  return v < 0.0f ? -m : m;
}

// The intensity epilogue for one value; p = the sample's kIntensityFields parameters.
M3D_HOST_DEVICE M3D_RS_INLINE float intensity(float v, const float* p, uint32_t key, int64_t idx) {
  const float gamma = p[2];
  if (gamma != 1.0f) v = signed_pow(v, gamma);
  v = v * p[0] + p[1];
  if (p[3] != 0.0f) v += p[3] * noise_normal(key, idx);
  // NaN stays NaN, as torch.clamp / the reference keep it: fmaxf/fminf return the other
  // operand, which turned a corrupt voxel into the clip minimum (-inf without a clip)
  return v != v ? v : fminf(fmaxf(v, p[4]), p[5]);
}

}  // namespace rs
}  // namespace med3d_ext
