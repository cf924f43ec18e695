// CUDA kernels for affine_resample and affine_resample_pair (see resample.h; resize:
// resize_cuda.cu).
//
// Each thread takes a few output voxels, all channels in the thread: in the general kernel a
// run of kVec consecutive voxels of a row; in the kPlain kernel (the augmentation's usual call)
// one voxel of each of kPlainVec rows, the 32 lanes of a warp on 32 consecutive voxels of a
// row (plain_tile_item; its former runs of kPlainVec stay selectable, see
// plain_layout). The sampling points are computed once from the matrix (no grid
// tensor), their taps are reused by every channel and by the fused label, and each output
// element is written exactly once. The image and
// the label of a pair share one launch: items [0, image_items) cover the image grid (and the
// label too when both grids coincide), the rest the label's own grid.

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "resample.h"
#include "resample_args.h"
#include "../common/cuda_utils.cuh"
#include "../common/run.h"

namespace med3d_ext {
namespace rs {
namespace {

constexpr int kThreads = 256;
// Consecutive output voxels along W per thread: the row's affine terms, the per-item index
// decoding and the theta loads are shared by kVec voxels, and aligned rows are stored as one
// vector per channel (float4 for fp32, 4 bytes for a uint8 label).
constexpr int kVec = 4;
// The kPlain kernel's runs (see pair_item): twice the voxels share the item's decoding, theta
// loads and row terms (SASS, sm_90: 143 -> 127 instructions per interior voxel, still 64
// registers without spills); the general kernel at 8 spilled more (its stack frame grew).
constexpr int kPlainVec = 8;
// The kPlain kernel's image items are warp tiles (plain_tile_item): kTileW consecutive voxels of
// a row, one per lane, each lane then walking kPlainVec rows.
constexpr int kTileW = 32;
// The kPlain kernel's table of base coordinates (D + H + W entries, 16 KiB of fp32 at most);
// larger grids take the general kernel.
constexpr int64_t kPlainTable = 4096;
// The kPlain kernel's grid: this many blocks per SM at most (twice the 4 that reside at once;
// see launch_prepared).
constexpr int64_t kPlainWaves = 8;
// The kPlain kernel's layouts of its image items (pair_kernel's kLayout): pair_item's runs, or
// plain_tile_item's warp tiles taking their rows one or two at a time.
constexpr int kRuns = 0, kTiles = 1, kTilePairs = 2;

// V elements stored with the widest instructions where the address is aligned to the whole
// pack (one for up to 16 bytes).
template <typename E, int V>
struct alignas(sizeof(E) * V) Pack {
  E v[V];
};

template <typename E, int V>
__device__ __forceinline__ void store_run(E* dst, const E (&v)[V], int nv, bool aligned) {
  if (aligned && nv == V) {
    Pack<E, V> p;
#pragma unroll
    for (int k = 0; k < V; ++k) p.v[k] = v[k];
    *reinterpret_cast<Pack<E, V>*>(dst) = p;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < nv) dst[k] = v[k];
  }
}

// The rare paths (elastic field, reflection padding, intensity epilogue) are out-of-line calls:
// inlined, their register needs would set the register budget, and the spills, of the whole
// kernel, the plain affine path included. Values are returned, not written through references,
// so the call does not force the caller's coordinates into local memory.
template <typename T>
struct Vec3 {
  T x, y, z;
};

template <typename T>
__device__ __noinline__ Vec3<T> elastic_call(const T* e, int64_t ED, int64_t EH, int64_t EW,
                                             int64_t d, int64_t h, int64_t w, int64_t D,
                                             int64_t H, int64_t W, Vec3<T> g) {
  add_elastic(e, ED, EH, EW, d, h, w, D, H, W, g.x, g.y, g.z);
  return g;
}

template <typename T>
__device__ __noinline__ T reflect_call(T c, int64_t size, bool align) {
  return source_index(c, size, kReflection, align);
}

template <typename T>
__device__ __forceinline__ T padded_index(T c, int64_t size, int pad, bool align) {
  return pad == kReflection ? reflect_call(c, size, align) : source_index(c, size, pad, align);
}

__device__ __noinline__ float intensity_call(float v, const float* p, uint32_t key, int64_t idx) {
  return intensity(v, p, key, idx);
}

template <typename scalar_t, typename T>
__device__ __forceinline__ scalar_t epilogue_call(T v, const float* p, uint32_t key, int64_t idx) {
  return static_cast<scalar_t>(p == nullptr ? v : intensity_call(static_cast<float>(v), p, key, idx));
}

// Loads through the read-only path, for sample_taps: kPlain's opaque pointers (see below) would
// otherwise load through generic addresses.
struct LdgLoad {
  template <typename E>
  __device__ __forceinline__ E operator()(const E* q) const { return __ldg(q); }
};

// One work item: up to V (kVec or kPlainVec) consecutive voxels (w0 ...) of output row (n, d, h)
// of the image grid
// (kImage: all image channels, then the fused label from the same points) or of the label's own
// grid. item_t is uint32_t whenever the item count fits (32-bit division is several times cheaper
// than 64-bit on the GPU), int64_t otherwise.
// kPlain: the augmentation's usual call, fixed at compile time: one image channel, one label
// channel, no elastic field, zeros padding, align_corners false; the label sampled at the
// image's points, and no intensity epilogue, unless a variant says otherwise (see the flags
// below; SASS, fp32 + uint8, sm_90: kPlainIntensity's loop body of an 8-voxel item is 2278 ->
// 2545 instructions plus one out-of-line epilogue call per voxel, still 64 registers, its
// only local-memory accesses in cosf's range reduction for arguments beyond 10^5, which the
// noise's 2*pi*u never reaches; with an 8-byte label both variants need 80 registers, see
// pair_kernel). The channel loops, the padding and
// elastic branches and their out-of-line calls then compile away (ncu on an H100, 2026-11-27: the general kernel issued ~470
// instructions per output voxel of this case, at 0.55 instructions per cycle per scheduler, 10%
// of the DRAM bandwidth). Further, for kPlain only (SASS of the fp32 + uint8 kernel, sm_90,
// nvcc 13.0: its grid-stride loop body, one item of 4 voxels, 1248 -> 896 instructions):
//   - the base coordinates come from the block's table `tab` (pair_kernel): base_coord's two
//     IEEE divisions and 64-bit conversions per voxel, and per row, were ~20% of the body;
//   - align_corners is a constant, not a runtime flag whose two formulas were both issued
//     (predicated) for each axis of each voxel;
//   - the per-sample input pointers are opaque to the compiler (an empty asm), so a tap's address
//     is one IMAD.WIDE from the pointer and its 32-bit offset: otherwise the compiler folds the
//     sample's 64-bit offset into every tap (a 64-bit add, shift and carry per load), and the
//     loads go through __ldg, as an opaque pointer loses the global space the compiler knew;
//   - a voxel whose 8 taps are all inside the input (interior_point: most of an augmented
//     patch) skips the border's clamps and validity factors, loads each row's two taps from one
//     pointer and rounds its nearest label voxel with one conversion per axis: the same values
//     bit for bit (checked on the CPU against the general helpers, 2.7M random points with
//     ties, integers and the last interior float). An item of 4 interior voxels: 896 -> 571
//     instructions on the interior path; a border voxel costs what it did (~195 each);
//   - runs of kPlainVec = 8 voxels: 127 instructions per interior voxel (1013 per item).
// Variants of the kPlain kernel (pair_kernel's flags), each compiled on its own:
//   kPlainIntensity: with the intensity epilogue (contrast, brightness, gamma, noise, clip:
//     intensity.h), which the training CLI's augmentation draws for every sample;
//   kPlainOwnLabel: the label on its own grid (the CLI's default --label-grid logits: a 4x
//     smaller grid), not sampled by the image items: its items, after the image's, take the
//     general kernel's label-only path (pair_items).
// Without them those calls ran the general kernel.
template <bool kImage, bool kPlain, bool kPlainIntensity, bool kPlainOwnLabel, typename scalar_t,
          typename label_t, typename T, typename index_t, typename item_t>
__device__ __forceinline__ void pair_item(const PairArgs<scalar_t, label_t, T>& a, item_t i,
                                          bool image_aligned, bool label_aligned, const T* tab) {
  static_assert(kPlain || !(kPlainIntensity || kPlainOwnLabel),
                "kPlainIntensity and kPlainOwnLabel are variants of the kPlain kernel");
  constexpr int V = kPlain ? kPlainVec : kVec;
  const int64_t C = kPlain ? 1 : a.C, LC = kPlain ? 1 : a.LC;
  const int pad = kPlain ? int(kZeros) : a.pad;
  const T* elastic = kPlain ? nullptr : a.elastic;
  const float* intensity = kPlain && !kPlainIntensity ? nullptr : a.intensity;
  const item_t D = kImage ? a.D : a.LD, H = kImage ? a.H : a.LH, W = kImage ? a.W : a.LW;
  const item_t WQ = (W + V - 1) / V;
  const item_t q = i % WQ, r = i / WQ;
  const item_t h = r % H, r2 = r / H;
  const item_t d = r2 % D, n = r2 / D;
  const int64_t w0 = int64_t(q) * V;
  const int nv = static_cast<int>(m_min<int64_t>(V, int64_t(W) - w0));
  const Grid<index_t> g = kImage ? make_grid<index_t>(a.ID, a.IH, a.IW)
                                 : make_grid<index_t>(a.LID, a.LIH, a.LIW);
  const index_t out_cs = static_cast<index_t>(int64_t(D) * H * W);
  const index_t in_cs = static_cast<index_t>(g.HW) * g.D;
  const index_t o0 = static_cast<index_t>((int64_t(d) * H + h) * W + w0);

  const T* t = a.theta + int64_t(n) * 12;
  T row[3];
  if constexpr (kPlain)
    row_terms(t, tab[D + h], tab[d], row);
  else
    row_terms(t, base_coord<T>(h, H, a.align), base_coord<T>(d, D, a.align), row);
  // (a compile-time constant in the kPlain kernels)
  const bool label = kPlain ? !kPlainOwnLabel : !kImage || (a.fused && a.label != nullptr);
  const float* p = intensity != nullptr ? intensity + int64_t(n) * kIntensityFields : nullptr;
  const uint32_t key = kImage && p != nullptr ? noise_key(a.seed != nullptr ? a.seed[n] : 0, n) : 0;
  const scalar_t* img_in = kImage ? a.image + int64_t(n) * C * in_cs : nullptr;
  if constexpr (kPlain) asm("" : "+l"(img_in));  // opaque: see kPlain above
  scalar_t* img_out = kImage ? a.image_out + int64_t(n) * C * out_cs + o0 : nullptr;
  const label_t* lab_in = label ? a.label + int64_t(n) * LC * in_cs : nullptr;
  if constexpr (kPlain) asm("" : "+l"(lab_in));
  label_t* lab_out = label ? a.label_out + int64_t(n) * LC * out_cs + o0 : nullptr;
  // Voxel by voxel, so that only one voxel's point and taps are live (registers bound the
  // occupancy of this gather-bound kernel); its taps serve all its image channels and its point
  // the fused label. A single channel (the usual case) collects the run in registers and stores
  // it as one pack.
  scalar_t img_pack[V];
  label_t lab_pack[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t w = m_min<int64_t>(w0 + k, int64_t(W) - 1);  // tail lanes repeat the last voxel
    const T bx = kPlain ? tab[D + H + w] : base_coord<T>(w, W, a.align);
    // m_mul: the CPU's rounding (no FMA), so nearest-neighbour ties go the same way
    Vec3<T> pt{m_mul(t[0], bx) + row[0], m_mul(t[4], bx) + row[1], m_mul(t[8], bx) + row[2]};
    if (elastic != nullptr)
      pt = elastic_call(elastic + int64_t(n) * 3 * a.ED * a.EH * a.EW, a.ED, a.EH, a.EW,
                        int64_t(d), int64_t(h), w, int64_t(D), int64_t(H), int64_t(W), pt);
    const bool align = kPlain ? false : a.align;  // kPlain: launch_prepared checked it
    const T cx = padded_index(pt.x, g.W, pad, align),
            cy = padded_index(pt.y, g.H, pad, align),
            cz = padded_index(pt.z, g.D, pad, align);
    if constexpr (kPlain) {
      // The interior (see interior_point): the same taps, weights and nearest voxel as below,
      // bit for bit, without the clamps and validity factors of the border.
      if (interior_point(cx, cy, cz, g)) {
        const AxisTap<T> x = interior_axis_tap(cx), y = interior_axis_tap(cy),
                         z = interior_axis_tap(cz);
        const T sv = sample_interior_taps(img_in, combine_taps(x, y, z, g), LdgLoad{});
        // channel 0: the noise index is the voxel's, as below
        img_pack[k] = kPlainIntensity ? epilogue_call<scalar_t, T>(sv, p, key, int64_t(o0) + k)
                                      : static_cast<scalar_t>(sv);
        if (label)
          lab_pack[k] = LdgLoad{}(lab_in + grid_offset(interior_axis_nearest(cx),
                                                       interior_axis_nearest(cy),
                                                       interior_axis_nearest(cz), g));
        continue;
      }
    }
    if constexpr (kImage) {
      const Taps<T, index_t> tp = trilinear_taps<T, index_t>(cx, cy, cz, g);
      for (int64_t c = 0; c < C; ++c) {
        const T sv = kPlain ? sample_taps(img_in, tp, LdgLoad{})
                            : sample_taps(img_in + c * in_cs, tp);
        const scalar_t v = epilogue_call<scalar_t, T>(sv, p, key, c * out_cs + o0 + k);
        if (C == 1) img_pack[k] = v;
        else if (k < nv) img_out[c * out_cs + k] = v;
      }
    }
    if (label) {
      const index_t src = nearest_offset<T, index_t>(cx, cy, cz, g);
      for (int64_t c = 0; c < LC; ++c) {
        const label_t v = src < 0  ? label_t(0)
                          : kPlain ? LdgLoad{}(lab_in + src)
                                   : lab_in[c * in_cs + src];
        if (LC == 1) lab_pack[k] = v;
        else if (k < nv) lab_out[c * out_cs + k] = v;
      }
    }
  }
  if (kImage && C == 1) store_run(img_out, img_pack, nv, image_aligned);
  if (label && LC == 1) store_run(lab_out, lab_pack, nv, label_aligned);
}

// The kPlain kernel's image item in its tiled layout (the default; MED3D_EXT_PLAIN_RESAMPLE_LAYOUT
// = runs selects pair_item's runs instead, to compare the two on a GPU): item i is lane i % 32 of
// warp tile i / 32, which covers kTileW consecutive voxels of kPlainVec consecutive rows of one
// output plane (n, d); lane l takes voxel w = w0 + l of each of the tile's rows. Why: in pair_item's
// runs, lane l takes voxels 8l .. 8l + 7, so one gather instruction of a warp reads taps about 8
// voxels apart, ~32 sectors over ~8 cache lines (ncu, H200: the kernel bound by L1 wavefronts,
// memory pipes 72%, DRAM 12%); here a warp's 32 taps of one instruction lie within ~33 voxels
// of one input row (1-3 lines at the augmentation's mild angles and scales), and its stores of
// one row are 32 consecutive elements. A lane's x terms (theta_x * bx) serve its 8 rows.
// Each voxel's arithmetic is pair_item's (kPlain) to the bit: the same products and sums in the
// same order, the same interior and border paths, the same noise index.
template <bool kPairs, bool kPlainIntensity, bool kPlainOwnLabel, typename scalar_t,
          typename label_t, typename T, typename index_t, typename item_t>
__device__ __forceinline__ void plain_tile_item(const PairArgs<scalar_t, label_t, T>& a, item_t i,
                                                const T* tab) {
  static_assert(std::is_same_v<index_t, int32_t>, "the tiles' offsets are 32-bit");
  const item_t D = a.D, H = a.H, W = a.W;
  const item_t WT = (W + kTileW - 1) / kTileW, HT = (H + kPlainVec - 1) / kPlainVec;
  const item_t lane = i % kTileW, tile = i / kTileW;
  const item_t wt = tile % WT, r = tile / WT;
  const item_t ht = r % HT, r2 = r / HT;
  const item_t d = r2 % D, n = r2 / D;
  const item_t w = wt * kTileW + lane;
  if (w >= W) return;  // the last tile of a row whose length is not a multiple of 32
  const item_t h0 = ht * kPlainVec;
  const Grid<index_t> g = make_grid<index_t>(a.ID, a.IH, a.IW);
  const index_t out_cs = static_cast<index_t>(int64_t(D) * H * W);
  const index_t in_cs = static_cast<index_t>(g.HW) * g.D;
  const T* t = a.theta + int64_t(n) * 12;
  const T bx = tab[D + H + w], bz = tab[d];
  // theta's terms in registers for the whole tile: read through `t` in the row loop, they were
  // loaded again after every row's stores (the compiler cannot tell the outputs from theta):
  // 9 loads a row (ncu SASS, H200). Each row's sums are row_terms' to the bit: the same
  // products, added in the same order.
  const T xx = m_mul(__ldg(t + 0), bx), xy = m_mul(__ldg(t + 4), bx), xz = m_mul(__ldg(t + 8), bx);
  const T ty0 = __ldg(t + 1), ty1 = __ldg(t + 5), ty2 = __ldg(t + 9);
  const T tz0 = m_mul(__ldg(t + 2), bz), tz1 = m_mul(__ldg(t + 6), bz), tz2 = m_mul(__ldg(t + 10), bz);
  const T tc0 = __ldg(t + 3), tc1 = __ldg(t + 7), tc2 = __ldg(t + 11);
  const float* p = kPlainIntensity ? a.intensity + int64_t(n) * kIntensityFields : nullptr;
  const uint32_t key = kPlainIntensity ? noise_key(a.seed != nullptr ? a.seed[n] : 0, n) : 0;
  // the epilogue's parameters in registers too (the interior path's inline epilogue; the border
  // path's out-of-line call takes `p`, as a pointer to a local array would put it in memory)
  float pv[kIntensityFields];
#pragma unroll
  for (int j = 0; j < kIntensityFields; ++j) pv[j] = kPlainIntensity ? __ldg(p + j) : 0.0f;
  const scalar_t* img_in = a.image + int64_t(n) * in_cs;
  asm("" : "+l"(img_in));  // opaque: see kPlain above pair_item
  scalar_t* img_out = a.image_out + int64_t(n) * out_cs;
  const label_t* lab_in = kPlainOwnLabel ? nullptr : a.label + int64_t(n) * in_cs;
  if constexpr (!kPlainOwnLabel) asm("" : "+l"(lab_in));
  label_t* lab_out = kPlainOwnLabel ? nullptr : a.label_out + int64_t(n) * out_cs;
  // row k's output offset and padded source point
  const auto offset = [&](int k) {
    return static_cast<index_t>((int64_t(d) * H + (h0 + k)) * W + w);
  };
  const auto point = [&](int k) {
    const T by = tab[D + h0 + k];
    return Vec3<T>{padded_index(xx + ((m_mul(ty0, by) + tz0) + tc0), g.W, kZeros, false),
                   padded_index(xy + ((m_mul(ty1, by) + tz1) + tc1), g.H, kZeros, false),
                   padded_index(xz + ((m_mul(ty2, by) + tz2) + tc2), g.D, kZeros, false)};
  };
  // an interior point's trilinear image value (before the epilogue: finish) and nearest label
  const auto interior_value = [&](const Vec3<T>& c) {
    const AxisTap<T> x = interior_axis_tap(c.x), y = interior_axis_tap(c.y),
                     z = interior_axis_tap(c.z);
    return sample_interior_taps(img_in, combine_taps(x, y, z, g), LdgLoad{});
  };
  const auto interior_label = [&](const Vec3<T>& c) {
    return LdgLoad{}(lab_in + grid_offset(interior_axis_nearest(c.x), interior_axis_nearest(c.y),
                                          interior_axis_nearest(c.z), g));
  };
  const auto finish = [&](T sv, index_t o) {
    // (o >= 0 in 32 bits: as an unsigned value its high word is known to be 0, and the
    // noise's hash of it folds to a constant)
    return kPlainIntensity ? static_cast<scalar_t>(intensity(static_cast<float>(sv), pv, key,
                                                             int64_t(static_cast<uint32_t>(o))))
                           : static_cast<scalar_t>(sv);
  };
  const auto row = [&](int k) {
    const index_t o = offset(k);
    const Vec3<T> c = point(k);
    scalar_t v;
    label_t lv = label_t(0);
    if (interior_point(c.x, c.y, c.z, g)) {
      v = finish(interior_value(c), o);
      if constexpr (!kPlainOwnLabel) lv = interior_label(c);
    } else {
      const Taps<T, index_t> tp = trilinear_taps<T, index_t>(c.x, c.y, c.z, g);
      v = epilogue_call<scalar_t, T>(sample_taps(img_in, tp, LdgLoad{}), p, key, int64_t(o));
      if constexpr (!kPlainOwnLabel) {
        const index_t src = nearest_offset<T, index_t>(c.x, c.y, c.z, g);
        if (src >= 0) lv = LdgLoad{}(lab_in + src);
      }
    }
    img_out[o] = v;
    if constexpr (!kPlainOwnLabel) lab_out[o] = lv;
  };
  // the last tile of a plane whose height is not a multiple of 8 has fewer rows
  const int rows = static_cast<int>(m_min<int64_t>(kPlainVec, int64_t(H) - int64_t(h0)));
  if constexpr (kPairs) {
    // Two rows at a time where both points are interior: their 16 image taps and 2 labels are
    // all loads with no store between them, so the compiler can issue them together (one row
    // gives 9 loads in flight per warp; ncu, H200: 35% of the cycles stalled on them). The
    // arithmetic is the row path's (the compiler may contract the weighted sums into FMAs in
    // another order: rounding only). An odd last row is computed twice, stored once.
    // (Selected by MED3D_EXT_PLAIN_RESAMPLE_LAYOUT=pairs until a GPU run says which is faster.)
#pragma unroll 1
    for (int k = 0; k < rows; k += 2) {
      const int k1 = k + 1 < rows ? k + 1 : k;
      const Vec3<T> ca = point(k), cb = point(k1);
      if (interior_point(ca.x, ca.y, ca.z, g) & interior_point(cb.x, cb.y, cb.z, g)) {
        // sample_interior_taps for both rows, written out so that every load comes before the
        // first use of any (the compiler, left to schedule two calls, loaded half of the second
        // row's taps only after the first row's sum: ~10 loads in flight, not 18; SASS sm_90)
        const Taps<T, index_t> ta = combine_taps(interior_axis_tap(ca.x), interior_axis_tap(ca.y),
                                                 interior_axis_tap(ca.z), g),
                               tb = combine_taps(interior_axis_tap(cb.x), interior_axis_tap(cb.y),
                                                 interior_axis_tap(cb.z), g);
        scalar_t ra[8], rb[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
          ra[j] = LdgLoad{}(img_in + (ta.zy[j >> 1] + ta.x[0]) + (j & 1));
#pragma unroll
        for (int j = 0; j < 8; ++j)
          rb[j] = LdgLoad{}(img_in + (tb.zy[j >> 1] + tb.x[0]) + (j & 1));
        label_t la = label_t(0), lb = label_t(0);
        if constexpr (!kPlainOwnLabel) {
          la = interior_label(ca);
          lb = interior_label(cb);
        }
        T va[8], vb[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          va[j] = static_cast<T>(ra[j]) * ta.w[j];
          vb[j] = static_cast<T>(rb[j]) * tb.w[j];
        }
        const T sa = sum8(va), sb = sum8(vb);
        const index_t oa = offset(k), ob = offset(k1);
        img_out[oa] = finish(sa, oa);
        if constexpr (!kPlainOwnLabel) lab_out[oa] = la;
        if (k1 != k) {
          img_out[ob] = finish(sb, ob);
          if constexpr (!kPlainOwnLabel) lab_out[ob] = lb;
        }
      } else {
        row(k);
        if (k1 != k) row(k1);
      }
    }
  } else if constexpr (kPlainIntensity) {
    // not unrolled: eight inlined copies of the epilogue (its noise's hash, log, sqrt and cos)
    // outgrew the instruction cache (ncu, H200: 41% of cycles with no instruction to issue)
#pragma unroll 1
    for (int k = 0; k < rows; ++k) row(k);
  } else {
#pragma unroll
    for (int k = 0; k < kPlainVec; ++k)
      if (k < rows) row(k);
  }
}

// Items [0, image_items) cover the image grid (and the fused label), the rest the label's own
// grid; a grid-stride loop, so any item count fits the launch.
// (kPlain with a fused label: every item is an image item. Label items come in runs of kVec
// whatever the kernel: launch_prepared counts them so.)
// kLayout (kPlain only; see PlainLayout): kTiles or kTilePairs: the image items are
// plain_tile_item's warp tiles (a multiple of 32 of them, so lane i % 32 is the thread's lane:
// the stride is a multiple of 32 too).
template <bool kPlain, bool kPlainIntensity, bool kPlainOwnLabel, int kLayout, typename scalar_t,
          typename label_t, typename T, typename index_t, typename item_t>
__device__ __forceinline__ void pair_items(const PairArgs<scalar_t, label_t, T>& a,
                                           item_t image_items, item_t total, bool image_aligned,
                                           bool label_aligned, const T* tab) {
  static_assert(kPlain || kLayout == kRuns, "tiles are a layout of the kPlain kernel");
  constexpr bool kLabelItems = !kPlain || kPlainOwnLabel;
  const item_t stride = item_t(gridDim.x) * kThreads;
  for (item_t i = item_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    if (!kLabelItems || i < image_items) {
      if constexpr (std::is_integral_v<scalar_t>) {
      } else if constexpr (kLayout != kRuns) {
        plain_tile_item<kLayout == kTilePairs, kPlainIntensity, kPlainOwnLabel, scalar_t, label_t,
                        T, index_t>(a, i, tab);
      } else {
        pair_item<true, kPlain, kPlainIntensity, kPlainOwnLabel, scalar_t, label_t, T, index_t>(
            a, i, image_aligned, label_aligned, tab);
      }
    } else if constexpr (kLabelItems) {
      pair_item<false, false, false, false, scalar_t, label_t, T, index_t>(
          a, i - image_items, false, label_aligned, tab);
    }
  }
}

// The general kernel (kPlain false): at least 2 resident blocks (<= 128 registers; its 32-bit
// fp32 + uint8 version uses 128 and a 32-byte stack frame). Held to 64 registers (4 blocks),
// the general kernel spilled (sm_90, nvcc 13.0: ~460 bytes for fp32 + uint8), and at 3 blocks
// (80 registers) stored 84 bytes / loaded 96; the latency of its gathers is instead covered by
// the kVec independent voxels of each thread. The kPlain kernel fits 64 registers without
// spills (see launch_prepared), hence its 4 blocks; its own-label variants spill a little
// there (ptxas, fp32 + uint8: 8 bytes stored, 4 loaded: a hoisted constant of the label path,
// reloaded once per label item, ~3% of the items at a 4x smaller label grid).
// The 32- and 64-bit item decodings are separate kernels, chosen on the host: compiled into one,
// the rare 64-bit path's registers set the budget of the common one too.
// To be tuned on the GPU (ncu: achieved occupancy vs. stall on L1TEX).
// (the kPlain variants with an 8-byte label: 3 blocks, as at 64 registers they spilled in the
// loop: for fp32 + int64, 4 stores and 4 loads per item with intensity, 26 local accesses with
// the label on its own grid; ptxas sm_90)
template <bool kPlain, bool kPlainIntensity, bool kPlainOwnLabel, int kLayout, typename scalar_t,
          typename label_t, typename T, typename index_t, typename item_t>
// (the row-pairs layout: 3 blocks too; at 64 registers its two rows' taps spilled, 16 bytes
// without intensity and 48-64 with it, ptxas sm_90)
__global__ void __launch_bounds__(
    kThreads, !kPlain                                                            ? 2
              : ((kPlainIntensity || kPlainOwnLabel) && sizeof(label_t) == 8) ||
                      kLayout == kTilePairs                                      ? 3
                                                                                 : 4)
pair_kernel(const PairArgs<scalar_t, label_t, T> a, item_t image_items, item_t total,
            bool image_aligned, bool label_aligned) {
  // kPlain: the base coordinates of the image grid's D, H and W axes, in that order (the same
  // base_coord values each voxel computed before, so the same bits), once per block
  extern __shared__ unsigned char tab_raw[];
  T* tab = reinterpret_cast<T*>(tab_raw);
  if constexpr (kPlain) {
    const int D = int(a.D), H = int(a.H), n = int(a.D + a.H + a.W);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
      tab[j] = j < D       ? base_coord<T>(j, a.D, false)
               : j < D + H ? base_coord<T>(j - D, a.H, false)
                           : base_coord<T>(j - D - H, a.W, false);
    __syncthreads();
  }
  pair_items<kPlain, kPlainIntensity, kPlainOwnLabel, kLayout, scalar_t, label_t, T, index_t,
             item_t>(a, image_items, total, image_aligned, label_aligned, tab);
}

// Whole packs of v voxels are aligned when rows are a multiple of v long and the tensor starts
// on a pack boundary (every row, channel and sample offset is then a multiple of v).
inline bool packs_aligned(const void* p, int64_t W, int64_t elem, int64_t v) {
  return W % v == 0 && reinterpret_cast<uintptr_t>(p) % (elem * v) == 0;
}

// The kPlain kernel's layout of image items: warp tiles (plain_tile_item) row by row, unless
// MED3D_EXT_PLAIN_RESAMPLE_LAYOUT asks for pair_item's runs of 8 ("runs") or the tiles' rows two
// at a time ("pairs"); read at every launch, so that a benchmark can time them in one process.
int plain_layout() {
  if (env_equals("MED3D_EXT_PLAIN_RESAMPLE_LAYOUT", "runs")) return kRuns;
  if (env_equals("MED3D_EXT_PLAIN_RESAMPLE_LAYOUT", "pairs")) return kTilePairs;
  return kTiles;
}

// A launch's work items (runs of v voxels, or kPlain's tiles), grid and flags.
struct Items {
  int64_t image = 0, total = 0, blocks = 0;
  bool small = false;  // 32-bit item decoding
  bool image_aligned = false, label_aligned = false;
};

void launch_prepared(const Prepared& p, int64_t N, int64_t pad, bool align) {
  if (N == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_pair(p, pad, align, [&](const auto& a, auto index_tag) {
    using A = std::decay_t<decltype(a)>;
    using index_t = decltype(index_tag);
    const bool image = a.image != nullptr && a.C > 0;
    const bool label = a.label != nullptr && a.LC > 0 && !(a.fused && image);
    const int64_t axes[6] = {a.ID, a.IH, a.IW, a.LID, a.LIH, a.LIW};
    for (int64_t s : axes)
      M3D_CHECK(s < (int64_t(1) << 30), "med3d_ext.affine_resample: input spatial sizes must be "
                "< 2^30 per axis, got ", s);
    const int64_t label_out_w = a.fused && image ? a.W : a.LW;
    // v: the image items' run length (and a fused label's); a label on its own grid always
    // comes in runs of kVec (the general label-only path decodes them so, in either kernel)
    // tiled: the kPlain kernel's image items are warp tiles (plain_tile_item) of 32 x v voxels
    const auto items = [&](int64_t v, bool tiled = false) {
      const int64_t lv = label ? int64_t(kVec) : v;
      Items r;
      r.image = !image ? 0
                : tiled ? N * a.D * ceil_div(a.H, v) * ceil_div(a.W, int64_t(kTileW)) * kTileW
                        : N * a.D * a.H * ceil_div(a.W, v);
      r.total = r.image + (label ? N * a.LD * a.LH * ceil_div(a.LW, lv) : 0);
      r.blocks = std::min<int64_t>(ceil_div(r.total, kThreads), int64_t(sm_count()) * 64);
      // 32-bit item decoding also needs the row lengths in 32 bits: a row of >= 2^32 voxels is
      // only ~2^32 / v items, and item_t(W) (and W + v - 1) would wrap.
      r.small = r.total <= int64_t(UINT32_MAX) - kThreads * r.blocks &&
                a.W <= int64_t(UINT32_MAX) - v && a.LW <= int64_t(UINT32_MAX) - v;
      r.image_aligned = image && packs_aligned(a.image_out, a.W, sizeof(*a.image_out), v);
      r.label_aligned = a.label != nullptr &&
                        packs_aligned(a.label_out, label_out_w, sizeof(*a.label_out), lv);
      return r;
    };
    using S = typename A::scalar_type;
    using L = typename A::label_type;
    using C = typename A::coord_type;
    // the plain case (see pair_item) has its own kernel, for fp32/fp16/bf16 images with 32-bit
    // offsets and item numbers: the augmentation's usual call. Its 64 registers (ptxas, sm_90,
    // nvcc 13.0; spills: see pair_kernel) let 4 blocks reside per SM, against 2 for the general
    // kernel (3 for its variants with an 8-byte label).
    // (with an intensity epilogue, or the label on its own grid: its variants, see pair_item)
    const bool plain = image && a.C == 1 && a.label != nullptr && a.LC == 1 &&
                       a.elastic == nullptr && a.pad == kZeros && !align &&
                       a.D + a.H + a.W <= kPlainTable;
    if constexpr (!std::is_integral_v<S> && !std::is_same_v<S, double> &&
                  std::is_same_v<index_t, int32_t>) {
      const int layout = plain_layout();
      const bool tiled = layout != kRuns;
      const Items it = plain ? items(kPlainVec, tiled) : Items{};
      if (plain && it.small) {
        if (it.total == 0) return;
        // At most kPlainWaves blocks per SM, the grid-stride loop taking the rest: a block first
        // fills its coordinate table (a division per entry) and waits at a barrier, which one
        // item of 8 voxels per thread did not amortise (ncu SASS, H200: 16% of the kernel's
        // instructions before the first voxel).
        const int64_t blocks = std::min<int64_t>(it.blocks, int64_t(sm_count()) * kPlainWaves);
        const auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(blocks), kThreads,
                   size_t(a.D + a.H + a.W) * sizeof(C), stream>>>(
              a, static_cast<uint32_t>(it.image), static_cast<uint32_t>(it.total),
              it.image_aligned, it.label_aligned);
        };
        const bool inten = a.intensity != nullptr, own = !a.fused;
        const auto variant = [&](auto layout_tag) {
          constexpr int kT = decltype(layout_tag)::value;
          if (!inten && !own)
            launch(pair_kernel<true, false, false, kT, S, L, C, index_t, uint32_t>);
          else if (inten && !own)
            launch(pair_kernel<true, true, false, kT, S, L, C, index_t, uint32_t>);
          else if (!inten)
            launch(pair_kernel<true, false, true, kT, S, L, C, index_t, uint32_t>);
          else
            launch(pair_kernel<true, true, true, kT, S, L, C, index_t, uint32_t>);
        };
        if (layout == kTilePairs) variant(std::integral_constant<int, kTilePairs>{});
        else if (layout == kTiles) variant(std::integral_constant<int, kTiles>{});
        else variant(std::integral_constant<int, kRuns>{});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    const Items it = items(kVec);
    if (it.total == 0) return;
    if (it.small) {
      pair_kernel<false, false, false, kRuns, S, L, C, index_t, uint32_t>
          <<<static_cast<unsigned>(it.blocks), kThreads, 0, stream>>>(
              a, static_cast<uint32_t>(it.image), static_cast<uint32_t>(it.total),
              it.image_aligned, it.label_aligned);
    } else {
      pair_kernel<false, false, false, kRuns, S, L, C, index_t, int64_t>
          <<<static_cast<unsigned>(it.blocks), kThreads, 0, stream>>>(
              a, it.image, it.total, it.image_aligned, it.label_aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor affine_resample_cuda(const at::Tensor& image, const at::Tensor& theta,
                                at::IntArrayRef size, int64_t mode, int64_t padding_mode,
                                bool align_corners) {
  const c10::cuda::CUDAGuard guard(image.device());
  Prepared p = prepare_single(image, theta, size, mode, padding_mode);
  launch_prepared(p, image.size(0), padding_mode, align_corners);
  return mode == kBilinear ? p.image_out : p.label_out;
}

std::tuple<at::Tensor, at::Tensor> affine_resample_pair_cuda(
    const at::Tensor& image, const at::Tensor& label, const at::Tensor& theta,
    at::IntArrayRef size, at::IntArrayRef label_size, const std::optional<at::Tensor>& elastic,
    const std::optional<at::Tensor>& intensity, const std::optional<at::Tensor>& seed,
    int64_t padding_mode, bool align_corners) {
  const c10::cuda::CUDAGuard guard(image.device());
  Prepared p = prepare_pair(image, label, theta, size, label_size, elastic, intensity, seed,
                            padding_mode);
  launch_prepared(p, image.size(0), padding_mode, align_corners);
  return {p.image_out, p.label_out};
}

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) {
  m.impl("affine_resample", &affine_resample_cuda);
  m.impl("affine_resample_pair", &affine_resample_pair_cuda);
}

}  // namespace rs
}  // namespace med3d_ext
