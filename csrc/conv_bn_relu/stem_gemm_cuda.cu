// implicit_gemm_conv3d on CUDA (see stem_gemm.h): a block gathers a tile of the im2col columns
// into shared memory with im2col.h's math and multiplies it there with WMMA (16x16x16 bf16/fp16
// fragments, fp32 accumulators). Shared-memory leading dimensions are padded by 8 elements
// (4 floats) against bank conflicts; every fragment pointer stays 32-byte aligned, as WMMA needs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "conv_bn_relu.h"
#include "im2col.h"
#include "stem_gemm.h"
#include "../common/checks.h"
#include "../common/cuda_utils.cuh"

namespace med3d_ext {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;              // 8 warps
constexpr int kBM = 128;                   // rows (output voxels) per tile
constexpr int kBN = int(kGemmCoutTile);    // output channels per block
constexpr int kKC = 32;                    // forward: columns per K step
constexpr int kKT = 64;                    // weight gradient: columns per block
constexpr int kLdA = kKC + 8;              // forward column tile (kBM x kKC), elements
constexpr int kLdB = kKC + 8;              // forward weight tile, (kBN x kKC) stored, elements
constexpr int kLdC = kBN + 8;              // fp32 accumulator tiles, floats (72: no 2-way
                                           // bank conflict in the fragment stores)
constexpr int kLdT = kKT + 8;              // weight gradient's grad and column tiles (kBM x 64)
static_assert(kBN == 64 && kKT == 64, "the weight-gradient tiling assumes 64 x 64 outputs");

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// One column of a tile: rows row0, row0 + kStep, ... (kCount of them) gathered from x, their
// loads issued kBatch at a time before any store (element_unbranched), which bounds the
// registers and keeps several loads in flight per thread.
template <int kCount, int kStep, int kLd>
__device__ __forceinline__ void gather_column(const uint16_t* __restrict__ x,
                                              const im2col::Geometry& g,
                                              const im2col::Row* rows, int nrows,
                                              const im2col::Tap& tap, int row0, int col,
                                              uint16_t* tile) {
  constexpr int kBatch = 8;
  static_assert(kCount % kBatch == 0, "whole batches");
#pragma unroll 1  // a batch at a time: unrolled, the forward kernel took 124 registers, not 64
  for (int b = 0; b < kCount; b += kBatch) {
    uint16_t v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int r = row0 + (b + i) * kStep;
      // a row past the matrix reads a written row's corner (any one) and is zeroed
      v[i] = im2col::element_unbranched(x, g, rows[r < nrows ? r : 0], tap, r < nrows);
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) tile[(row0 + (b + i) * kStep) * kLd + col] = v[i];
  }
}

// rows (M, cout) = columns (M, Kp) x wm^T (Kp, cout); block (row tile, channel tile). The
// weight tile is kept as wm's (channel, column) rows and read as a column-major B fragment: the
// layout mma wants, so bf16 fragments need no transposing moves (MOVM). Warp w owns
// rows 16w .. 16w + 15 of the tile, all 64 channels (4 accumulator fragments). Every column's
// tap is computed once per block into dynamic shared memory (Kp entries), not once per K step.
// M and Kp are < 2^31 (the host checks): the divisions are 32-bit.
template <typename T>
__global__ void __launch_bounds__(kThreads)
implicit_gemm_fprop_kernel(const uint16_t* __restrict__ x, const T* __restrict__ wm,
                           T* __restrict__ y, im2col::Geometry g, int64_t M, int cout) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host never launches this there
#else
  constexpr int kAElems = kBM * kLdA, kBElems = kBN * kLdB;
  constexpr int kABBytes = (kAElems + kBElems) * 2, kCBytes = kBM * kLdC * 4;
  __shared__ __align__(128) unsigned char smem[kABBytes > kCBytes ? kABBytes : kCBytes];
  __shared__ im2col::Row rows[kBM];
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  im2col::Tap* taps = reinterpret_cast<im2col::Tap*>(dynamic_smem);  // g.Kp entries
  uint16_t* a_bits = reinterpret_cast<uint16_t*>(smem);
  const T* a_tile = reinterpret_cast<const T*>(smem);
  T* b_tile = reinterpret_cast<T*>(smem) + kAElems;
  float* c_tile = reinterpret_cast<float*>(smem);  // after the K loop, over the A/B tiles

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const int nrows = static_cast<int>(M - m0 < kBM ? M - m0 : kBM);
  for (int r = tid; r < nrows; r += kThreads) rows[r] = im2col::make_row<int32_t>(g, m0 + r);
  for (int k = tid; k < g.Kp; k += kThreads) taps[k] = im2col::make_tap<int32_t>(g, k);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBN / 16];
  for (int j = 0; j < kBN / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
  const int col = tid % kKC, row0 = tid / kKC;  // a warp gathers one row's 32 columns
  for (int64_t k0 = 0; k0 < g.Kp; k0 += kKC) {
    __syncthreads();  // rows[] and taps[] written; the last step's MMAs are done with the tiles
    gather_column<kBM / (kThreads / kKC), kThreads / kKC, kLdA>(x, g, rows, nrows, taps[k0 + col],
                                                               row0, col, a_bits);
    {  // channels n0 .. n0 + 63, columns k0 .. k0 + 31 of wm: a 16-byte vector per thread
      const int n = tid / (kKC / 8), k8 = (tid % (kKC / 8)) * 8;
      *reinterpret_cast<uint4*>(b_tile + n * kLdB + k8) =
          *reinterpret_cast<const uint4*>(wm + (n0 + n) * g.Kp + k0 + k8);
    }
    __syncthreads();
    for (int kk = 0; kk < kKC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, a_tile + warp * 16 * kLdA + kk, kLdA);
      for (int j = 0; j < kBN / 16; ++j) {
        // B (column k, channel n) = b_tile[n * kLdB + k]: column-major
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, b_tile + j * 16 * kLdB + kk, kLdB);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }
  __syncthreads();  // every warp is done with the A/B tiles that the C tile reuses
  for (int j = 0; j < kBN / 16; ++j)
    wmma::store_matrix_sync(c_tile + warp * 16 * kLdC + j * 16, acc[j], kLdC,
                            wmma::mem_row_major);
  __syncthreads();
  for (int v = tid; v < kBM * (kBN / 8); v += kThreads) {  // 16-byte stores of 8 channels
    const int r = v / (kBN / 8), c8 = (v % (kBN / 8)) * 8;
    if (r >= nrows) continue;
    alignas(16) T out[8];
    for (int q = 0; q < 8; ++q) out[q] = from_float<T>(c_tile[r * kLdC + c8 + q]);
    *reinterpret_cast<uint4*>(y + (m0 + r) * cout + n0 + c8) =
        *reinterpret_cast<const uint4*>(out);
  }
#endif
}

// partial[part] (cout, Kp) = sum over this block's row tiles of grad^T (64 channels x 128 rows)
// x columns (128 rows x 64 columns); block (part, column tile, channel tile), the row tiles
// part, part + parts, ... Warp w owns channel block w % 4 and column blocks 2 (w / 4) + {0, 1}.
template <typename T>
__global__ void __launch_bounds__(kThreads)
implicit_gemm_wgrad_kernel(const uint16_t* __restrict__ x, const T* __restrict__ grad,
                           float* __restrict__ partial, im2col::Geometry g, int64_t M, int cout) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int kTile = kBM * kLdT;
  static_assert(2 * kTile * 2 >= kBN * kLdC * 4, "the C tile reuses the grad/column tiles");
  __shared__ __align__(128) unsigned char smem[2 * kTile * 2];
  __shared__ im2col::Row rows[kBM];
  T* g_tile = reinterpret_cast<T*>(smem);                           // (row, channel)
  uint16_t* a_bits = reinterpret_cast<uint16_t*>(smem) + kTile;     // (row, column)
  const T* a_tile = reinterpret_cast<const T*>(a_bits);
  float* c_tile = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t k0 = int64_t(blockIdx.y) * kKT;
  const int n0 = blockIdx.z * kBN;
  const int col = tid % kKT, row0 = tid / kKT;
  const im2col::Tap tap = im2col::make_tap<int32_t>(g, k0 + col);  // this thread's column
  const int nb = warp % 4, kb0 = (warp / 4) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  const int64_t tiles = (M + kBM - 1) / kBM;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t m0 = t * kBM;
    const int nrows = static_cast<int>(M - m0 < kBM ? M - m0 : kBM);
    __syncthreads();  // the last tile's MMAs are done with the shared tiles
    for (int r = tid; r < nrows; r += kThreads) rows[r] = im2col::make_row<int32_t>(g, m0 + r);
    for (int v = tid; v < kBM * (kBN / 8); v += kThreads) {  // grad rows, zero past M
      const int r = v / (kBN / 8), c8 = (v % (kBN / 8)) * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < nrows) val = *reinterpret_cast<const uint4*>(grad + (m0 + r) * cout + n0 + c8);
      *reinterpret_cast<uint4*>(g_tile + r * kLdT + c8) = val;
    }
    __syncthreads();  // rows[] ready
    gather_column<kBM / (kThreads / kKT), kThreads / kKT, kLdT>(x, g, rows, nrows, tap, row0,
                                                               col, a_bits);
    __syncthreads();
    for (int kk = 0; kk < kBM; kk += 16) {  // the reduction runs over the tile's rows
      // grad^T (channel, row) is the (row, channel) tile read column-major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
      wmma::load_matrix_sync(a, g_tile + kk * kLdT + nb * 16, kLdT);
      for (int q = 0; q < 2; ++q) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, a_tile + kk * kLdT + (kb0 + q) * 16, kLdT);
        wmma::mma_sync(acc[q], a, b, acc[q]);
      }
    }
  }
  __syncthreads();
  for (int q = 0; q < 2; ++q)
    wmma::store_matrix_sync(c_tile + nb * 16 * kLdC + (kb0 + q) * 16, acc[q], kLdC,
                            wmma::mem_row_major);
  __syncthreads();
  float* out = partial + (int64_t(blockIdx.x) * cout + n0) * g.Kp + k0;
  for (int v = tid; v < kBN * (kKT / 4); v += kThreads) {
    const int r = v / (kKT / 4), c4 = (v % (kKT / 4)) * 4;
    *reinterpret_cast<float4*>(out + int64_t(r) * g.Kp + c4) =
        *reinterpret_cast<const float4*>(c_tile + r * kLdC + c4);
  }
#endif
}

// The forward's dynamic shared memory (its tap table) and the static tiles beside it.
int64_t fprop_dynamic_bytes(const im2col::Geometry& g) {
  return g.Kp * int64_t(sizeof(im2col::Tap));
}
int64_t fprop_smem_bytes(const im2col::Geometry& g) {
  constexpr int64_t kAB = (kBM * kLdA + kBN * kLdB) * 2, kC = kBM * kLdC * 4;
  return fprop_dynamic_bytes(g) + (kAB > kC ? kAB : kC) + kBM * int64_t(sizeof(im2col::Row));
}

// True when the kernels this process runs on the current device were compiled for sm_80 or
// newer: a build whose arch list ends in an older "+PTX" is JIT-compiled from that PTX on a
// newer GPU, and the kernels' bodies there are the __trap() of the guard above.
bool kernels_compiled_for_device() {
  static int cached[64] = {};  // per device: 0 unknown, 1 yes, 2 no
  const int dev = c10::cuda::current_device();
  int& c = cached[dev < 64 ? dev : 63];
  if (c == 0) {
    cudaFuncAttributes a{};
    const bool ok = cudaFuncGetAttributes(&a, implicit_gemm_fprop_kernel<__nv_bfloat16>) ==
                        cudaSuccess && a.ptxVersion >= 80;
    (void)cudaGetLastError();  // a failed query is an answer (no), not a sticky error
    c = ok ? 1 : 2;
  }
  return c == 1;
}

// The kernels' domain: bf16/fp16, Cout a positive multiple of 64, a non-empty x, sm_80 or
// newer, 32-bit row and column counts, and the forward's tap table within a block's shared
// memory.
bool kernels_apply(const at::Tensor& x, int64_t cout, const im2col::Geometry& g, int64_t M) {
  const auto st = x.scalar_type();
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return (st == at::kBFloat16 || st == at::kHalf) && cout > 0 && cout % kBN == 0 &&
         x.numel() > 0 &&  // element_unbranched reads x[0] for voxels outside the volume
         prop->major >= 8 && M < (int64_t(1) << 31) && g.Kp < (int64_t(1) << 31) &&
         fprop_smem_bytes(g) <= int64_t(prop->sharedMemPerBlockOptin) &&
         kernels_compiled_for_device();
}

template <typename F>
void dispatch_half(const at::Tensor& x, F&& fn) {
  if (x.scalar_type() == at::kBFloat16) return fn(__nv_bfloat16{});
  return fn(__half{});
}

// Resident weight-gradient blocks per SM (the occupancy API), asked once per dtype and device:
// it depends only on the compiled kernel and the GPU, and a backward step should not query the
// driver for it every time.
int wgrad_blocks_per_sm(const at::Tensor& x) {
  static int cached[2][64] = {};  // 0: not asked yet
  const int dev = c10::cuda::current_device();
  int& c = cached[x.scalar_type() == at::kBFloat16 ? 0 : 1][dev < 64 ? dev : 63];
  if (c == 0) {
    int per_sm = 0;
    dispatch_half(x, [&](auto tag) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, implicit_gemm_wgrad_kernel<decltype(tag)>, kThreads, 0));
    });
    c = std::max(per_sm, 1);
  }
  return c;
}

// The kernels read 16-byte vectors: a tensor whose data starts off a 16-byte boundary (a view
// with a storage offset) is copied first.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

at::Tensor implicit_gemm_conv3d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  const c10::cuda::CUDAGuard guard(x.device());
  im2col::Geometry g;
  const int64_t M = check_implicit_gemm_conv3d(x, weight, stride, padding, dilation, kKC, g);
  const int64_t cout = weight.size(0);
  if (!kernels_apply(x, cout, g, M))
    return im2col_conv_rows(x, weight, ConvArgs{stride, padding, dilation, kIm2col});
  at::Tensor y = at::empty({M, cout}, x.options());
  if (M == 0) return y;
  // weight as (Cout, Kp): K in im2col's column order, zero columns past K
  at::Tensor wm = weight.reshape({cout, g.K});
  if (g.Kp != g.K) wm = at::constant_pad_nd(wm, {0, g.Kp - g.K});
  wm = aligned16(wm);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kBM)), static_cast<unsigned>(cout / kBN));
  M3D_CHECK(ceil_div(M, kBM) < (int64_t(1) << 31) && cout / kBN <= 65535,
            "med3d_ext.implicit_gemm_conv3d: ", M, " rows x ", cout, " channels are too many");
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t dynamic = fprop_dynamic_bytes(g);
  dispatch_half(x, [&](auto tag) {
    using T = decltype(tag);
    if (fprop_smem_bytes(g) > 48 * 1024)  // beyond the default, the block must opt in
      C10_CUDA_CHECK(cudaFuncSetAttribute(implicit_gemm_fprop_kernel<T>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(dynamic)));
    implicit_gemm_fprop_kernel<T><<<grid, kThreads, dynamic, stream>>>(
        static_cast<const uint16_t*>(x.const_data_ptr()),
        static_cast<const T*>(wm.const_data_ptr()), static_cast<T*>(y.mutable_data_ptr()), g, M,
        static_cast<int>(cout));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor implicit_gemm_conv3d_weight_grad_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                                 at::IntArrayRef weight_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation) {
  const c10::cuda::CUDAGuard guard(x.device());
  im2col::Geometry g;
  const int64_t M = check_implicit_gemm_weight_grad(grad_rows, x, weight_size, stride, padding,
                                                    dilation, kKT, g);
  const int64_t cout = weight_size[0];
  if (!kernels_apply(x, cout, g, M))
    return implicit_gemm_weight_grad_by_im2col(grad_rows, x, weight_size, stride, padding,
                                               dilation);
  if (M == 0 || g.K == 0) return at::zeros(weight_size, x.options());
  const at::Tensor grad = aligned16(grad_rows);
  const int64_t tiles = ceil_div(M, kBM), col_tiles = g.Kp / kKT, ch_tiles = cout / kBN;
  // one wave of resident blocks in all, each summing an equal share of the row tiles
  const int64_t parts = std::clamp<int64_t>(
      int64_t(wgrad_blocks_per_sm(x)) * sm_count() / (col_tiles * ch_tiles), 1, tiles);
  M3D_CHECK(col_tiles <= 65535 && ch_tiles <= 65535, "med3d_ext.implicit_gemm_conv3d_weight_grad: ",
            g.Kp, " columns x ", cout, " channels are too many");
  at::Tensor partial = at::empty({parts, cout, g.Kp}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(ch_tiles));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half(x, [&](auto tag) {
    using T = decltype(tag);
    implicit_gemm_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(x.const_data_ptr()),
        static_cast<const T*>(grad.const_data_ptr()), partial.mutable_data_ptr<float>(), g, M,
        static_cast<int>(cout));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // the shares summed in a fixed order (deterministic), rounded once to x's dtype
  return partial.sum(0).narrow(1, 0, g.K).to(x.scalar_type()).reshape(weight_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) {
  m.impl("implicit_gemm_conv3d", &implicit_gemm_conv3d_cuda);
  m.impl("implicit_gemm_conv3d_weight_grad", &implicit_gemm_conv3d_weight_grad_cuda);
}

}  // namespace med3d_ext
