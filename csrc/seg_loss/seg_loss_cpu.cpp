// CPU kernels for multihead_seg_loss (see seg_loss.h): the same tiles and per-voxel math as the
// CUDA path; tiles run in parallel, their partials are summed in index order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "seg_loss.h"
#include "../common/checks.h"

namespace med3d_ext {
namespace {

// The head owning global tile b (heads are few: a linear scan).
size_t head_of_tile(const std::vector<SegHead>& heads, int64_t b) {
  size_t h = 0;
  while (h + 1 < heads.size() && heads[h + 1].tile_begin <= b) ++h;
  return h;
}

int64_t load_target(const SegHead& d, int64_t i) {
  return d.target_u8 ? int64_t(static_cast<const uint8_t*>(d.target)[i])
                     : static_cast<const int64_t*>(d.target)[i];
}

// Partial sums of one tile: I[C], P[C], T[C], CE sum, weight sum; and the bad-label summary.
template <typename scalar_t, typename acc_t>
void tile_forward(const SegHead& d, int64_t local, const acc_t* cw, int64_t ignore_index,
                  acc_t* z, acc_t* sums, double* part, int64_t* bad) {
  const int C = d.C;
  const int64_t S = d.S, s = local / d.tiles_per_sample;
  const int64_t v0 = (local % d.tiles_per_sample) * kSegTile, v1 = std::min(S, v0 + kSegTile);
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + s * C * S;
  std::fill(sums, sums + 3 * C + 2, acc_t(0));
  int64_t nbad = 0, bmin = std::numeric_limits<int64_t>::max(), bmax = std::numeric_limits<int64_t>::min();
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t t = load_target(d, s * S + v);
    const int cls = classify_label(t, C, ignore_index);
    if (cls == -2) {
      ++nbad;
      bmin = std::min(bmin, t);
      bmax = std::max(bmax, t);
    }
    if (cls < 0) continue;  // ignored or bad: in neither term
    for (int c = 0; c < C; ++c) z[c] = static_cast<acc_t>(x[c * S + v]);
    const acc_t zt = z[cls];
    const acc_t lse = softmax_inplace<0>(z, C);
    const acc_t w = cw ? cw[d.cw_offset + cls] : acc_t(1);
    for (int c = 0; c < C; ++c) sums[C + c] += z[c];
    sums[cls] += z[cls];
    sums[2 * C + cls] += acc_t(1);
    sums[3 * C] += w * (lse - zt);
    sums[3 * C + 1] += w;
  }
  for (int j = 0; j < 3 * C + 2; ++j) part[j] = static_cast<double>(sums[j]);
  bad[0] = nbad;
  bad[1] = bmin;
  bad[2] = bmax;
}

// Sums the tiles of every slot and head in index order and writes the four outputs.
template <typename acc_t>
void finish(const SegPlan& plan, const std::vector<double>& part, const std::vector<int64_t>& bad,
            double ce_w, double dice_w, double smooth, at::Tensor& total, at::Tensor& per_head,
            at::Tensor& bad_labels, at::Tensor& saved) {
  acc_t* st = saved.data_ptr<acc_t>();
  acc_t* ph = per_head.data_ptr<acc_t>();
  int64_t* bl = bad_labels.data_ptr<int64_t>();
  const acc_t* hw = plan.head_weights.defined() ? plan.head_weights.const_data_ptr<acc_t>() : nullptr;
  const int64_t slots = plan.slots;
  double sum = 0;
  for (size_t h = 0; h < plan.heads.size(); ++h) {
    const SegHead& d = plan.heads[h];
    const int C = d.C;
    const int64_t tps = d.tiles_per_sample, stride = 3 * C + 2;
    const double scale = d.n > 0 ? dice_w / (double(d.n) * C) : 0.0;
    double dice = 0, ce = 0, wsum = 0;
    for (int64_t s = 0; s < d.n; ++s)
      for (int c = 0; c < C; ++c) {
        double I = 0, P = 0, T = 0;
        for (int64_t k = 0; k < tps; ++k) {
          const double* p = part.data() + d.part_begin + (s * tps + k) * stride;
          I += p[c];
          P += p[C + c];
          T += p[2 * C + c];
        }
        double term, a, b;
        dice_slot(I, P, T, smooth, scale, &term, &a, &b);
        const int64_t slot = d.slot_begin + s * C + c;
        st[slot] = acc_t(a);
        st[slots + slot] = acc_t(b);
        st[2 * slots + slot] = acc_t(term);
        dice += term;
      }
    int64_t nbad = 0, bmin = std::numeric_limits<int64_t>::max(), bmax = std::numeric_limits<int64_t>::min();
    for (int64_t k = 0; k < d.n * tps; ++k) {
      const double* p = part.data() + d.part_begin + k * stride;
      ce += p[3 * C];
      wsum += p[3 * C + 1];
      const int64_t* q = bad.data() + 3 * (d.tile_begin + k);
      nbad += q[0];
      bmin = std::min(bmin, q[1]);
      bmax = std::max(bmax, q[2]);
    }
    bl[3 * h] = nbad;
    bl[3 * h + 1] = bmin;
    bl[3 * h + 2] = bmax;
    // as F.cross_entropy(weight=...): the weighted mean whatever the sum's sign (negative
    // class weights are allowed there); a sum of 0 (no valid voxel) gives 0, not NaN
    st[3 * slots + h] = acc_t(wsum != 0 ? ce_w / wsum : 0.0);
    const double loss = ce_w * (wsum != 0 ? ce / wsum : 0.0) + (d.n > 0 ? scale * dice : 0.0);
    ph[h] = acc_t(loss);
    sum += (hw ? double(hw[h]) : 1.0) * loss;
  }
  *total.data_ptr<acc_t>() = acc_t(sum);  // a store, not a dispatched fill_
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multihead_seg_loss_cpu(
    at::TensorList logits, at::TensorList targets, const c10::optional<at::Tensor>& head_weights,
    const c10::optional<at::Tensor>& class_weights, double ce_weight, double dice_weight,
    double smooth, int64_t ignore_index) {
  SegPlan plan = make_seg_plan("multihead_seg_loss", logits, targets, head_weights, class_weights);
  auto [total, per_head, bad_labels, saved] = seg_loss_outputs(plan, logits[0].device());
  std::vector<double> part(plan.parts);
  std::vector<int64_t> bad(3 * plan.tiles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.logits[0].scalar_type(),
                                  "multihead_seg_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cw = plan.class_weights.defined() ? plan.class_weights.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, plan.tiles, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> z(plan.max_c), sums(3 * plan.max_c + 2);
      for (int64_t b = b0; b < b1; ++b) {
        const SegHead& d = plan.heads[head_of_tile(plan.heads, b)];
        tile_forward<scalar_t, acc_t>(d, b - d.tile_begin, cw, ignore_index, z.data(), sums.data(),
                                      part.data() + d.part_begin + (b - d.tile_begin) * (3 * d.C + 2),
                                      bad.data() + 3 * b);
      }
    });
    finish<acc_t>(plan, part, bad, ce_weight, dice_weight, smooth, total, per_head, bad_labels, saved);
  });
  return {total, per_head, bad_labels, saved};
}

std::vector<at::Tensor> multihead_seg_loss_backward_cpu(
    at::TensorList logits, at::TensorList targets, const at::Tensor& saved,
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_per_head,
    const c10::optional<at::Tensor>& head_weights, const c10::optional<at::Tensor>& class_weights,
    int64_t ignore_index) {
  SegPlan plan = make_seg_plan("multihead_seg_loss_backward", logits, targets, head_weights,
                               class_weights);
  SegGrads gin;
  std::vector<at::Tensor> grads =
      seg_loss_backward_outputs(plan, saved, grad_total, grad_per_head, &gin);
  const int64_t H = static_cast<int64_t>(plan.heads.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.logits[0].scalar_type(),
                                  "multihead_seg_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cw = plan.class_weights.defined() ? plan.class_weights.const_data_ptr<acc_t>() : nullptr;
    const acc_t* hw = plan.head_weights.defined() ? plan.head_weights.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sp = saved.const_data_ptr<acc_t>();
    const acc_t gt = gin.total.defined() ? *gin.total.const_data_ptr<acc_t>() : acc_t(0);
    const acc_t* gp = gin.per_head.defined() ? gin.per_head.const_data_ptr<acc_t>() : nullptr;
    std::vector<acc_t> g(H);
    for (int64_t h = 0; h < H; ++h)
      g[h] = gt * (hw ? hw[h] : acc_t(1)) + (gp ? gp[h * gin.ph_stride] : acc_t(0));
    at::parallel_for(0, plan.tiles, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> z(plan.max_c), out(plan.max_c);
      for (int64_t b = b0; b < b1; ++b) {
        const size_t h = head_of_tile(plan.heads, b);
        const SegHead& d = plan.heads[h];
        const int C = d.C;
        const int64_t local = b - d.tile_begin, S = d.S, s = local / d.tiles_per_sample;
        const int64_t v0 = (local % d.tiles_per_sample) * kSegTile, v1 = std::min(S, v0 + kSegTile);
        const scalar_t* x = static_cast<const scalar_t*>(d.logits) + s * C * S;
        scalar_t* gx = static_cast<scalar_t*>(d.grad) + s * C * S;
        const acc_t* a = sp + d.slot_begin + s * C;
        const acc_t* bb = sp + plan.slots + d.slot_begin + s * C;
        const acc_t ce_scale = sp[3 * plan.slots + h];
        for (int64_t v = v0; v < v1; ++v) {
          const int cls = classify_label(load_target(d, s * S + v), C, ignore_index);
          if (cls < 0) {
            for (int c = 0; c < C; ++c) gx[c * S + v] = scalar_t(0);
            continue;
          }
          for (int c = 0; c < C; ++c) z[c] = static_cast<acc_t>(x[c * S + v]);
          softmax_inplace<0>(z.data(), C);
          const acc_t w = cw ? cw[d.cw_offset + cls] : acc_t(1);
          voxel_grad<0>(z.data(), a, bb, C, cls, g[h], g[h] * ce_scale * w, out.data());
          for (int c = 0; c < C; ++c) gx[c * S + v] = static_cast<scalar_t>(out[c]);
        }
      }
    });
  });
  return grads;
}

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) {
  m.impl("multihead_seg_loss", &multihead_seg_loss_cpu);
  m.impl("multihead_seg_loss_backward", &multihead_seg_loss_backward_cpu);
}

}  // namespace med3d_ext
