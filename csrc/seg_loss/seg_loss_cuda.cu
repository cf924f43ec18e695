// CUDA kernels for multihead_seg_loss (see seg_loss.h).
//
// Forward, two launches for all heads: `partial` (one block per tile; a tile never crosses a
// (head, sample) boundary, so a block keeps one set of per-class sums in registers and writes
// 3 C + 2 partials, no atomics) and `finish` (one block; a warp per slot / head sums the tiles
// in index order). Backward, one launch: `backward` re-reads the logits tile by tile and writes
// every head's gradient. The head table travels as a __grid_constant__ kernel parameter.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "seg_loss.h"
#include "../common/checks.h"
#include "../common/cuda_utils.cuh"

namespace med3d_ext {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32, kFinishThreads = 1024;
constexpr int kPerThread = kSegTile / kThreads;  // voxels per thread in a full tile
// Registers bound both kernels to 2 resident blocks of 256 (asking ptxas for 3, <= 80 registers,
// made them spill), so a thread's own loads are what hides memory latency. The first versions
// visited a full tile's voxels one at a time, and their SASS issued a voxel's loads only after
// the previous voxel's softmax: one voxel's loads in flight per thread, 20-22% of the DRAM
// bandwidth at 25% occupancy (ncu on an H100, 2026-11-27: partial 30.7 us, backward 29.9 us
// for the 8-head target case). Now a full tile is walked in stages of kStage voxels whose
// loads (the target and every logit) are all issued before any of them is computed on.
// kStage is bounded by the registers the staged logits take (K per voxel), chosen with ptxas
// (sm_90, nvcc 13.0) for no spills: K = 4, 4 voxels in 3 resident blocks (<= 80 registers);
// K = 8, 4 (partial, 115 registers at fp32) and 2 (backward, 126) in 2 blocks. Larger K and
// double precision keep one voxel per stage with a budget of one block: K = 16 fits (fp32
// partial 153 registers, backward 196) but K = 32 and double precision spill (fp32 backward
// 912 bytes stored; fp64 partial ~3 KB), as before the staging (a class count above 16 is rare
// in the heads this serves; to be looked at with ncu if one matters).
// The partial and backward kernels assume blockDim.x == kThreads (the tile stride and the
// red[kWarps] rows): both launches below use it.
template <typename acc_t, int K>
constexpr int partial_stage() { return sizeof(acc_t) > 4 ? 1 : K <= 8 ? 4 : 1; }
template <typename acc_t, int K>
constexpr int backward_stage() { return sizeof(acc_t) > 4 ? 1 : K <= 4 ? 4 : K <= 8 ? 2 : 1; }
template <typename acc_t, int K>
constexpr int min_blocks() { return sizeof(acc_t) > 4 ? 1 : K <= 4 ? 3 : K <= 8 ? 2 : 1; }
static_assert(kPerThread % 8 == 0, "stages must divide the voxels per thread");

struct HeadTable {
  SegHead h[kMaxHeadsCuda];
  int num;
};

__device__ __forceinline__ int head_of_tile(const HeadTable& tab, int64_t b) {
  int h = 0;
  while (h + 1 < tab.num && tab.h[h + 1].tile_begin <= b) ++h;
  return h;
}

__device__ __forceinline__ int64_t load_target(const SegHead& d, int64_t i) {
  return d.target_u8 ? int64_t(static_cast<const uint8_t*>(d.target)[i])
                     : static_cast<const int64_t*>(d.target)[i];
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ void warp_min_max(T& lo, T& hi) {
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_down_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_down_sync(0xffffffffu, hi, o));
  }
}

// Voxel v's label and its first C logits (x: the sample's (C, S) block, s its sample; unused
// z[c >= C]). C and S come in as the caller's registers, not re-read from the head table.
template <typename scalar_t, int K>
__device__ __forceinline__ void load_voxel(const SegHead& d, const scalar_t* __restrict__ x,
                                           int64_t s, int64_t S, int C, int64_t v,
                                           at::opmath_type<scalar_t> (&z)[K], int64_t& t) {
  t = load_target(d, s * S + v);
#pragma unroll
  for (int c = 0; c < K; ++c)
    if (c < C) z[c] = static_cast<at::opmath_type<scalar_t>>(x[c * S + v]);
}

// This thread's voxels of tile [v0, v1) of sample s, each loaded (load_voxel) and handed to
// use(v, z, t): a full tile in stages of kStage voxels whose loads are all issued before any
// is used, a partial one voxel by voxel.
template <int kStage, typename scalar_t, int K, typename Use>
__device__ __forceinline__ void walk_tile(const SegHead& d, const scalar_t* __restrict__ x,
                                          int64_t s, int64_t S, int C, int64_t v0, int64_t v1,
                                          Use&& use) {
  using acc_t = at::opmath_type<scalar_t>;
  if (v1 - v0 == kSegTile) {
#pragma unroll
    for (int k0 = 0; k0 < kPerThread; k0 += kStage) {
      acc_t z[kStage][K];
      int64_t t[kStage];
#pragma unroll
      for (int j = 0; j < kStage; ++j)
        load_voxel<scalar_t, K>(d, x, s, S, C, v0 + (k0 + j) * kThreads + threadIdx.x, z[j],
                                t[j]);
#pragma unroll
      for (int j = 0; j < kStage; ++j) use(v0 + (k0 + j) * kThreads + threadIdx.x, z[j], t[j]);
    }
  } else {
    for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads) {
      acc_t z[K];
      int64_t t;
      load_voxel<scalar_t, K>(d, x, s, S, C, v, z, t);
      use(v, z, t);
    }
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, min_blocks<at::opmath_type<scalar_t>, K>())
    partial_kernel(const __grid_constant__ HeadTable tab, const at::opmath_type<scalar_t>* cw,
                   int64_t ignore_index, at::opmath_type<scalar_t>* __restrict__ part,
                   int64_t* __restrict__ bad) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWarps][3 * K + 2];
  __shared__ int64_t red_bad[kWarps][3];
  const int64_t b = blockIdx.x;
  const SegHead& d = tab.h[head_of_tile(tab, b)];
  const int C = d.C;
  const int64_t S = d.S, local = b - d.tile_begin, s = local / d.tiles_per_sample;
  const int64_t v0 = (local % d.tiles_per_sample) * kSegTile, v1 = min(S, v0 + kSegTile);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(d.logits) + s * C * S;
  acc_t I[K], P[K], T[K], ce = 0, wsum = 0;
#pragma unroll
  for (int c = 0; c < K; ++c) I[c] = P[c] = T[c] = 0;
  int64_t nbad = 0, bmin = std::numeric_limits<int64_t>::max(), bmax = std::numeric_limits<int64_t>::min();
  auto accumulate = [&](int64_t, acc_t (&z)[K], int64_t t) {
    const int cls = classify_label(t, C, ignore_index);
    if (cls == -2) {
      ++nbad;
      bmin = min(bmin, t);
      bmax = max(bmax, t);
    }
    if (cls < 0) return;
    acc_t zt = 0;
#pragma unroll
    for (int c = 0; c < K; ++c)
      if (c == cls) zt = z[c];
    const acc_t lse = softmax_inplace<K>(z, C);
    const acc_t w = cw ? cw[d.cw_offset + cls] : acc_t(1);
    ce += w * (lse - zt);
    wsum += w;
#pragma unroll
    for (int c = 0; c < K; ++c)
      if (c < C) {
        P[c] += z[c];
        if (c == cls) {
          I[c] += z[c];
          T[c] += acc_t(1);
        }
      }
  };
  walk_tile<partial_stage<acc_t, K>(), scalar_t, K>(d, x, s, S, C, v0, v1, accumulate);
  // Block reduction in a fixed order: warp trees, then warps summed in index order.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < K; ++c)
    if (c < C) {
      const acc_t i = warp_sum(I[c]), p = warp_sum(P[c]), tt = warp_sum(T[c]);
      if (lane == 0) {
        red[warp][c] = i;
        red[warp][C + c] = p;
        red[warp][2 * C + c] = tt;
      }
    }
  ce = warp_sum(ce);
  wsum = warp_sum(wsum);
  nbad = warp_sum(nbad);
  warp_min_max(bmin, bmax);
  if (lane == 0) {
    red[warp][3 * C] = ce;
    red[warp][3 * C + 1] = wsum;
    red_bad[warp][0] = nbad;
    red_bad[warp][1] = bmin;
    red_bad[warp][2] = bmax;
  }
  __syncthreads();
  acc_t* out = part + d.part_begin + local * (3 * C + 2);
  for (int j = threadIdx.x; j < 3 * C + 2; j += kThreads) {
    acc_t v = 0;
    for (int k = 0; k < kWarps; ++k) v += red[k][j];
    out[j] = v;
  }
  if (threadIdx.x == 0) {
    int64_t cnt = 0, lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (int k = 0; k < kWarps; ++k) {
      cnt += red_bad[k][0];
      lo = min(lo, red_bad[k][1]);
      hi = max(hi, red_bad[k][2]);
    }
    bad[3 * b] = cnt;
    bad[3 * b + 1] = lo;
    bad[3 * b + 2] = hi;
  }
}

// One block of kFinishThreads, three phases, each in a fixed order (bitwise reproducible):
//  1. warps take work items strided by the warp count: items [0, slots) are the (head, sample,
//     class) Dice slots, items [slots, slots + H) the heads' CE sums and bad-label summaries,
//     so both kinds share one round; lanes sum tiles strided by 32, a warp tree finishes;
//  2. a warp per head sums its Dice terms the same way;
//  3. thread 0 sums the heads.
// (The first version ran slots, then heads, in rounds of 16 warps, then one thread per head
// adding its Dice terms one dependent global load after another: 9 us for the 8-head target
// case on an H100, ncu 2026-11-27, of ~60 us for the whole loss.)
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const __grid_constant__ HeadTable tab, const acc_t* __restrict__ part,
                  const int64_t* __restrict__ bad, const acc_t* hw, double ce_w, double dice_w,
                  double smooth, int64_t slots, acc_t* total, acc_t* per_head, int64_t* bad_out,
                  acc_t* saved) {
  __shared__ double s_ce[kMaxHeadsCuda], s_w[kMaxHeadsCuda], s_loss[kMaxHeadsCuda];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int64_t items = slots + tab.num;
  for (int64_t it = warp; it < items; it += nw) {  // warp-uniform: it is the warp's
    if (it < slots) {
      const int64_t gs = it;
      int h = 0;
      while (h + 1 < tab.num && tab.h[h + 1].slot_begin <= gs) ++h;
      const SegHead& d = tab.h[h];
      const int C = d.C;
      const int64_t loc = gs - d.slot_begin, s = loc / C, c = loc % C, tps = d.tiles_per_sample;
      double I = 0, P = 0, T = 0;
      for (int64_t k = lane; k < tps; k += 32) {
        const acc_t* p = part + d.part_begin + (s * tps + k) * (3 * C + 2);
        I += p[c];
        P += p[C + c];
        T += p[2 * C + c];
      }
      I = warp_sum(I);
      P = warp_sum(P);
      T = warp_sum(T);
      if (lane == 0) {
        double term, a, b;
        dice_slot(I, P, T, smooth, dice_w / (double(d.n) * C), &term, &a, &b);
        saved[gs] = acc_t(a);
        saved[slots + gs] = acc_t(b);
        saved[2 * slots + gs] = acc_t(term);
      }
    } else {
      const int h = static_cast<int>(it - slots);
      const SegHead& d = tab.h[h];
      const int64_t stride = 3 * d.C + 2;
      double ce = 0, w = 0;
      long long cnt = 0, lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
      for (int64_t k = lane; k < d.n * d.tiles_per_sample; k += 32) {
        const acc_t* p = part + d.part_begin + k * stride;
        ce += p[3 * d.C];
        w += p[3 * d.C + 1];
        const int64_t* q = bad + 3 * (d.tile_begin + k);
        cnt += q[0];
        lo = min(lo, (long long)q[1]);
        hi = max(hi, (long long)q[2]);
      }
      ce = warp_sum(ce);
      w = warp_sum(w);
      cnt = warp_sum(cnt);
      warp_min_max(lo, hi);
      if (lane == 0) {
        s_ce[h] = ce;
        s_w[h] = w;
        bad_out[3 * h] = cnt;
        bad_out[3 * h + 1] = lo;
        bad_out[3 * h + 2] = hi;
        saved[3 * slots + h] = acc_t(w != 0 ? ce_w / w : 0.0);  // as the CPU (seg_loss_cpu.cpp)
      }
    }
  }
  __syncthreads();  // also makes the Dice terms written above visible to the whole block
  for (int h = warp; h < tab.num; h += nw) {
    const SegHead& d = tab.h[h];
    const int64_t terms = int64_t(d.n) * d.C;
    double dice = 0;
    for (int64_t k = lane; k < terms; k += 32) dice += double(saved[2 * slots + d.slot_begin + k]);
    dice = warp_sum(dice);
    if (lane == 0) {
      const double loss = ce_w * (s_w[h] != 0 ? s_ce[h] / s_w[h] : 0.0) +
                          (d.n > 0 ? dice_w * dice / double(terms) : 0.0);
      per_head[h] = acc_t(loss);
      s_loss[h] = loss;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0;
    for (int h = 0; h < tab.num; ++h) sum += (hw ? double(hw[h]) : 1.0) * s_loss[h];
    *total = acc_t(sum);
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, min_blocks<at::opmath_type<scalar_t>, K>())
    backward_kernel(const __grid_constant__ HeadTable tab, const at::opmath_type<scalar_t>* saved,
                    int64_t slots, const at::opmath_type<scalar_t>* cw,
                    const at::opmath_type<scalar_t>* hw, const at::opmath_type<scalar_t>* grad_total,
                    const at::opmath_type<scalar_t>* grad_per_head, int64_t ph_stride,
                    int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int h = head_of_tile(tab, b);
  const SegHead& d = tab.h[h];
  const int C = d.C;
  const int64_t S = d.S, local = b - d.tile_begin, s = local / d.tiles_per_sample;
  const int64_t v0 = (local % d.tiles_per_sample) * kSegTile, v1 = min(S, v0 + kSegTile);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(d.logits) + s * C * S;
  scalar_t* __restrict__ gx = static_cast<scalar_t*>(d.grad) + s * C * S;
  acc_t a[K], bb[K];
#pragma unroll
  for (int c = 0; c < K; ++c)
    if (c < C) {
      a[c] = saved[d.slot_begin + s * C + c];
      bb[c] = saved[slots + d.slot_begin + s * C + c];
    }
  // Unused outputs arrive as null gradients (zero), not as zero-filled tensors.
  const acc_t g = (grad_total ? grad_total[0] * (hw ? hw[h] : acc_t(1)) : acc_t(0)) +
                  (grad_per_head ? grad_per_head[h * ph_stride] : acc_t(0));
  const acc_t ce_scale = saved[3 * slots + h];
  auto emit = [&](int64_t v, acc_t (&z)[K], int64_t t) {
    const int cls = classify_label(t, C, ignore_index);
    acc_t out[K];
    if (cls >= 0) {
      softmax_inplace<K>(z, C);
      const acc_t w = cw ? cw[d.cw_offset + cls] : acc_t(1);
      voxel_grad<K>(z, a, bb, C, cls, g, g * ce_scale * w, out);
    } else {
#pragma unroll
      for (int c = 0; c < K; ++c) out[c] = 0;
    }
#pragma unroll
    for (int c = 0; c < K; ++c)
      if (c < C) gx[c * S + v] = static_cast<scalar_t>(out[c]);
  };
  walk_tile<backward_stage<acc_t, K>(), scalar_t, K>(d, x, s, S, C, v0, v1, emit);
}

// Compile-time class bound from the largest head.
#define M3D_SEG_K_SWITCH(MAXC, K, ...)                                        \
  [&] {                                                                       \
    if ((MAXC) <= 4) { constexpr int K = 4; return __VA_ARGS__(); }           \
    else if ((MAXC) <= 8) { constexpr int K = 8; return __VA_ARGS__(); }      \
    else if ((MAXC) <= 16) { constexpr int K = 16; return __VA_ARGS__(); }    \
    else { constexpr int K = 32; return __VA_ARGS__(); }                      \
  }()

HeadTable make_table(const char* op, const SegPlan& plan) {
  M3D_CHECK(plan.heads.size() <= size_t(kMaxHeadsCuda), "med3d_ext.", op, ": the CUDA kernel takes "
              "at most ", kMaxHeadsCuda, " heads per call, got ", plan.heads.size());
  M3D_CHECK(plan.max_c <= kMaxClassesCuda, "med3d_ext.", op, ": the CUDA kernel takes at most ",
              kMaxClassesCuda, " classes per head, got a head with ", plan.max_c);
  // one block per tile, and gridDim.x is at most 2^31 - 1
  M3D_CHECK(plan.tiles < std::numeric_limits<int32_t>::max(), "med3d_ext.", op,
            ": the CUDA kernel takes at most ", std::numeric_limits<int32_t>::max() - 1,
            " tiles per call (of ", kSegTile, " voxels; each sample of each head starts one), got ",
            plan.tiles);
  HeadTable tab{};
  for (size_t h = 0; h < plan.heads.size(); ++h) tab.h[h] = plan.heads[h];
  tab.num = static_cast<int>(plan.heads.size());
  return tab;
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multihead_seg_loss_cuda(
    at::TensorList logits, at::TensorList targets, const c10::optional<at::Tensor>& head_weights,
    const c10::optional<at::Tensor>& class_weights, double ce_weight, double dice_weight,
    double smooth, int64_t ignore_index) {
  M3D_CHECK(!logits.empty(), "med3d_ext.multihead_seg_loss: no heads (argument 'logits' is an empty list)");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  SegPlan plan = make_seg_plan("multihead_seg_loss", logits, targets, head_weights, class_weights);
  const HeadTable tab = make_table("multihead_seg_loss", plan);
  auto [total, per_head, bad_labels, saved] = seg_loss_outputs(plan, logits[0].device());
  // One scratch allocation for the tile partials (acc_t) and the tiles' bad-label summaries
  // (int64, 8-byte aligned after them).
  const int64_t acc_bytes = plan.acc == at::kDouble ? 8 : 4;
  const int64_t bad_off = (plan.parts * acc_bytes + 7) / 8 * 8;
  auto work = at::empty({bad_off + 3 * plan.tiles * 8}, saved.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.logits[0].scalar_type(),
                                  "multihead_seg_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* part = reinterpret_cast<acc_t*>(work.data_ptr<uint8_t>());
    int64_t* bad = reinterpret_cast<int64_t*>(work.data_ptr<uint8_t>() + bad_off);
    if (plan.tiles > 0) {
      M3D_SEG_K_SWITCH(plan.max_c, K, [&] {
        partial_kernel<scalar_t, K><<<plan.tiles, kThreads, 0, stream>>>(
            tab, opt_ptr<acc_t>(plan.class_weights), ignore_index, part, bad);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<acc_t><<<1, kFinishThreads, 0, stream>>>(
        tab, part, bad,
        opt_ptr<acc_t>(plan.head_weights), ce_weight, dice_weight, smooth, plan.slots,
        total.data_ptr<acc_t>(), per_head.data_ptr<acc_t>(), bad_labels.data_ptr<int64_t>(),
        saved.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {total, per_head, bad_labels, saved};
}

std::vector<at::Tensor> multihead_seg_loss_backward_cuda(
    at::TensorList logits, at::TensorList targets, const at::Tensor& saved,
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_per_head,
    const c10::optional<at::Tensor>& head_weights, const c10::optional<at::Tensor>& class_weights,
    int64_t ignore_index) {
  M3D_CHECK(!logits.empty(), "med3d_ext.multihead_seg_loss_backward: no heads");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  SegPlan plan = make_seg_plan("multihead_seg_loss_backward", logits, targets, head_weights,
                               class_weights);
  SegGrads gin;
  std::vector<at::Tensor> grads =
      seg_loss_backward_outputs(plan, saved, grad_total, grad_per_head, &gin);
  if (plan.tiles == 0) return grads;
  const HeadTable tab = make_table("multihead_seg_loss_backward", plan);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.logits[0].scalar_type(),
                                  "multihead_seg_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    M3D_SEG_K_SWITCH(plan.max_c, K, [&] {
      backward_kernel<scalar_t, K><<<plan.tiles, kThreads, 0, stream>>>(
          tab, saved.const_data_ptr<acc_t>(), plan.slots, opt_ptr<acc_t>(plan.class_weights),
          opt_ptr<acc_t>(plan.head_weights), opt_ptr<acc_t>(gin.total),
          opt_ptr<acc_t>(gin.per_head), gin.ph_stride, ignore_index);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grads;
}

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) {
  m.impl("multihead_seg_loss", &multihead_seg_loss_cuda);
  m.impl("multihead_seg_loss_backward", &multihead_seg_loss_backward_cuda);
}

}  // namespace med3d_ext
