// Multi-head segmentation loss: cross-entropy + soft Dice for every decoder head in one pass.
//
//   multihead_seg_loss(logits[], targets[], head_weights?, class_weights?, ce_weight,
//                      dice_weight, smooth, ignore_index) -> (total, per_head, bad_labels, saved)
//     logits[h]     (n_h, C_h, *spatial_h) float32/bfloat16/float16/float64, all of one dtype
//                   and device; C_h >= 2. CUDA: at most kMaxHeadsCuda heads of at most
//                   kMaxClassesCuda classes (the Python wrapper sends larger calls to the
//                   reference)
//     targets[h]    (n_h, *spatial_h) uint8 or int64 class indices
//     head_weights  (H,) floating or None (all 1)
//     class_weights (sum_h C_h,) floating or None: the per-head CE class weights, concatenated
//     total         () sum_h head_weights[h] * per_head[h]
//     per_head      (H,) unweighted ce_weight * CE_h + dice_weight * Dice_h
//     bad_labels    (H, 3) int64: count, smallest and largest label outside [0, C_h) that is
//                   not ignore_index (count 0: min/max meaningless). Bad voxels are ignored.
//     saved         (3 * slots + H,) over the (h, s, c) slots: the Dice gradient coefficients
//                   a[slots], b[slots], the Dice terms[slots]; then per head ce_scale[H]
//   Outputs are float32 (float64 for float64 logits).
//
//   multihead_seg_loss_backward(logits[], targets[], saved, grad_total?, grad_per_head?,
//                               head_weights?, class_weights?, ignore_index) -> grads[]
//     grad_total    () or None (zero); grad_per_head (H,) any stride (autograd hands in
//                   expanded ones) or None (zero): unused outputs cost no zero-filled tensor
//     grads[h] like logits[h] (contiguous)
//
// Autograd is registered in C++ (seg_loss_autograd.cpp), not from Python: a Python
// autograd.Function plus the Python-side registered autograd cost several times the launch
// floor in host time per call, and this op exists to be launch-bound.
//
// Semantics, per head, over valid voxels (target != ignore_index and in [0, C)):
//   CE   = sum_v w[t_v] * (lse_v - z_{t_v}) / sum_v w[t_v]    (0 when no voxel is valid)
//   Dice = mean over (sample s, class c) of 1 - (2 I_sc + smooth) / (P_sc + T_sc + smooth)
//          I = sum p_c [t == c], P = sum p_c, T = sum [t == c]  (0 for a head with n_h = 0)
// which is MONAI's DiceCELoss(softmax=True, to_onehot_y=True) when nothing is ignored or
// weighted.
//
// Gradient wrt the logits at a valid voxel (g = grad_total * hw_h + grad_per_head_h):
//   dL/dz_c = g * ( ce_scale * w_t * (p_c - [c == t]) + p_c * (q_c - sum_k p_k q_k) )
//   q_c = a_sc - [c == t] b_sc,  a = dice_weight / (n C) * num / den^2,
//   b = dice_weight / (n C) * 2 / den,  ce_scale = ce_weight / sum w
// (q is dDice/dp; the p_c (q_c - p.q) factor is the softmax Jacobian applied to it.)
//
// Work is cut into tiles of kSegTile voxels that never cross a (head, sample) boundary. Each tile
// writes 3 C + 2 partial sums; a finishing step sums the tiles of each slot in index order.
// The cut depends only on the shapes, so results are bitwise reproducible on a device.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/macros.h"

// Unroll the bounded class loops on the GPU; host compilers would warn on the pragma.
#if defined(__CUDACC__)
#define M3D_SEG_UNROLL _Pragma("unroll")
#else
#define M3D_SEG_UNROLL
#endif

namespace med3d_ext {

constexpr int64_t kSegTile = 2048;
constexpr int kMaxHeadsCuda = 48;     // the head table travels as a kernel parameter (< 4 KiB)
constexpr int kMaxClassesCuda = 32;   // per-thread class accumulators live in registers
// Any device: SegHead's n and C are int32, and a tile's 3 C + 2 partials are indexed in int.
constexpr int64_t kMaxSegSamples = 2147483647;
constexpr int64_t kMaxSegClasses = (kMaxSegSamples - 2) / 3;

// One head, as the kernels see it. Offsets are global indices into the tile / slot / partial
// arrays that all heads share.
struct SegHead {
  const void* logits;   // (n, C, S) contiguous
  const void* target;   // (n, S) contiguous
  void* grad;           // (n, C, S), backward only
  int64_t S;            // voxels per sample
  int32_t n, C;
  int32_t target_u8;    // 1: uint8 targets, 0: int64
  int32_t cw_offset;    // index of this head's class weights in the flat tensor
  int64_t tile_begin;   // first tile of this head
  int64_t tiles_per_sample;
  int64_t slot_begin;   // first (sample, class) slot
  int64_t part_begin;   // first partial value; a tile has 3 C + 2 of them
};

// ---- per-voxel math, shared by the CPU and CUDA kernels ------------------------------------
// K is the compile-time bound of the class loops (so GPU arrays stay in registers); K = 0 means
// "no bound": loop to the runtime C (CPU).

template <int K>
M3D_HOST_DEVICE int class_bound(int C) { return K > 0 ? K : C; }

// Replaces logits z[0..C) by softmax probabilities; returns log-sum-exp. A NaN anywhere makes
// every probability NaN (the max below keeps a NaN in z[0]; a later NaN poisons the sum).
template <int K, typename acc_t>
M3D_HOST_DEVICE acc_t softmax_inplace(acc_t* z, int C) {
  acc_t m = z[0];
  M3D_SEG_UNROLL
  for (int c = 1; c < class_bound<K>(C); ++c)
    if (c < C) m = z[c] > m ? z[c] : m;
  acc_t sum = 0;
  M3D_SEG_UNROLL
  for (int c = 0; c < class_bound<K>(C); ++c)
    if (c < C) {
      z[c] = std::exp(z[c] - m);
      sum += z[c];
    }
  const acc_t inv = acc_t(1) / sum;
  M3D_SEG_UNROLL
  for (int c = 0; c < class_bound<K>(C); ++c)
    if (c < C) z[c] *= inv;
  return m + std::log(sum);
}

// Label classification: -1 ignored (ignore_index), -2 bad (outside [0, C)), else the class.
M3D_HOST_DEVICE int classify_label(int64_t t, int C, int64_t ignore_index) {
  if (t == ignore_index) return -1;
  if (t < 0 || t >= C) return -2;
  return static_cast<int>(t);
}

// Dice term of one (sample, class) slot and its gradient coefficients (see the header comment).
M3D_HOST_DEVICE void dice_slot(double I, double P, double T, double smooth, double scale,
                               double* term, double* a, double* b) {
  const double num = 2.0 * I + smooth, den = P + T + smooth;
  *term = 1.0 - num / den;
  *a = scale * num / (den * den);
  *b = scale * 2.0 / den;
}

// Gradient wrt the logits of one valid voxel of class t, given probabilities p, the Dice
// coefficients a, b of its sample, g = upstream gradient of the head's loss and
// ce = g * ce_scale * w_t. Writes out[0..C).
template <int K, typename acc_t>
M3D_HOST_DEVICE void voxel_grad(const acc_t* p, const acc_t* a, const acc_t* b, int C, int t,
                                acc_t g, acc_t ce, acc_t* out) {
  acc_t dot = 0;
  M3D_SEG_UNROLL
  for (int c = 0; c < class_bound<K>(C); ++c)
    if (c < C) dot += p[c] * (a[c] - (c == t ? b[c] : acc_t(0)));
  M3D_SEG_UNROLL
  for (int c = 0; c < class_bound<K>(C); ++c)
    if (c < C) {
      const acc_t q = a[c] - (c == t ? b[c] : acc_t(0));
      out[c] = g * p[c] * (q - dot) + ce * (p[c] - (c == t ? acc_t(1) : acc_t(0)));
    }
}

// ---- host-side plumbing shared by both devices ---------------------------------------------

// Everything per call is planned on the host from shapes and pointers; the only tensors made
// are copies of non-contiguous inputs (and dtype conversions of the optional weights).
struct SegPlan {
  std::vector<SegHead> heads;
  std::vector<at::Tensor> logits, targets;  // contiguous versions kept alive
  at::Tensor head_weights, class_weights;   // acc dtype, contiguous, or undefined
  at::ScalarType acc;                       // kFloat or kDouble
  int64_t tiles = 0, slots = 0, parts = 0;
  int max_c = 0;
};

// The backward's incoming gradients, in the accumulation dtype (converted only when they are
// not): either may be undefined (zero). grad_per_head is read as per_head[h * ph_stride].
struct SegGrads {
  at::Tensor total, per_head;
  int64_t ph_stride = 0;
};

// Checks every argument (errors name the head, the argument and what was given) and lays out
// the tiles, slots and partials.
SegPlan make_seg_plan(const char* op, at::TensorList logits, at::TensorList targets,
                      const c10::optional<at::Tensor>& head_weights,
                      const c10::optional<at::Tensor>& class_weights);

// Checks the backward's saved statistics and incoming gradients against the plan, allocates
// one gradient per head and points the plan's head table at them (shared by CPU and CUDA).
std::vector<at::Tensor> seg_loss_backward_outputs(SegPlan& plan, const at::Tensor& saved,
                                                  const c10::optional<at::Tensor>& grad_total,
                                                  const c10::optional<at::Tensor>& grad_per_head,
                                                  SegGrads* grads_in);

// `t` in dtype `st` and contiguous; returns `t` itself (no dispatched op) when it already is.
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType st);

// Empty outputs of the forward op, sized from the plan.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seg_loss_outputs(const SegPlan& plan,
                                                                           at::Device device);

}  // namespace med3d_ext
