// Argument checks and work layout for multihead_seg_loss, shared by the CPU and CUDA entries.

#include <limits>
#include <string>

#include "seg_loss.h"
#include "../common/checks.h"

namespace med3d_ext {
namespace {

std::string head_arg(const char* name, size_t h) {
  return std::string(name) + "[" + std::to_string(h) + "]";
}

}  // namespace

SegPlan make_seg_plan(const char* op, at::TensorList logits, at::TensorList targets,
                      const c10::optional<at::Tensor>& head_weights,
                      const c10::optional<at::Tensor>& class_weights) {
  M3D_CHECK(!logits.empty(), "med3d_ext.", op, ": no heads (argument 'logits' is an empty list)");
  M3D_CHECK(logits.size() == targets.size(), "med3d_ext.", op, ": got ", logits.size(),
              " logits tensors but ", targets.size(), " targets tensors; need one per head");
  SegPlan plan;
  const at::Tensor& first = logits[0];
  const int64_t H = static_cast<int64_t>(logits.size());
  int64_t total_classes = 0;
  // The argument names in the messages are built only when a check fails: this runs on every
  // call, and the op is meant to cost little more than its launches.
  for (size_t h = 0; h < logits.size(); ++h) {
    const at::Tensor& x = logits[h];
    const at::Tensor& t = targets[h];
    M3D_CHECK_ARG(x.defined() && x.dim() >= 2, op, head_arg("logits", h), x, "(n, C, *spatial)");
    const auto st = x.scalar_type();
    M3D_CHECK_ARG(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                  op, head_arg("logits", h), x,
                  "floating point (float32, bfloat16, float16 or float64)");
    M3D_CHECK_ARG(st == first.scalar_type(), op, head_arg("logits", h), x,
                  std::string("of the same dtype as logits[0] (") +
                      c10::toString(first.scalar_type()) + ")");
    M3D_CHECK_ARG(x.device() == first.device(), op, head_arg("logits", h), x,
                  "on the same device as logits[0] (" + first.device().str() + ")");
    M3D_CHECK_ARG(x.size(1) >= 2, op, head_arg("logits", h), x,
                  "of at least 2 classes (softmax over C; give a binary head 2 channels)");
    // SegHead keeps n and C as int32, and a tile's 3 C + 2 partial sums are indexed in int: a
    // larger size wrapped (a negative fill length on the CPU, wrong offsets everywhere)
    M3D_CHECK_ARG(x.size(0) <= kMaxSegSamples && x.size(1) <= kMaxSegClasses, op,
                  head_arg("logits", h), x,
                  "of at most " + std::to_string(kMaxSegSamples) + " samples and " +
                      std::to_string(kMaxSegClasses) + " classes");
    M3D_CHECK_ARG(t.defined() && (t.scalar_type() == at::kByte || t.scalar_type() == at::kLong),
                  op, head_arg("targets", h), t, "uint8 or int64 class indices");
    M3D_CHECK_ARG(t.device() == first.device(), op, head_arg("targets", h), t,
                  "on the same device as logits[0] (" + first.device().str() + ")");
    bool same = t.dim() == x.dim() - 1 && t.size(0) == x.size(0);
    for (int64_t d = 2; same && d < x.dim(); ++d) same = t.size(d - 1) == x.size(d);
    if (!same) {
      std::vector<int64_t> expect{x.size(0)};
      for (int64_t d = 2; d < x.dim(); ++d) expect.push_back(x.size(d));
      M3D_CHECK(false, "med3d_ext.", op, ": head ", h, ": targets shape ", t.sizes(),
                " does not match logits shape ", x.sizes(), " (expected targets ",
                at::IntArrayRef(expect), ")");
    }
    total_classes += x.size(1);
  }
  // class weight offsets (SegHead::cw_offset) are int32
  M3D_CHECK(total_classes <= std::numeric_limits<int32_t>::max(), "med3d_ext.", op,
            ": the heads have ", total_classes, " classes in all; at most ",
            std::numeric_limits<int32_t>::max(), " are supported");
  plan.acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (head_weights.has_value() && head_weights->defined()) {
    const at::Tensor& w = *head_weights;
    M3D_CHECK_ARG(w.dim() == 1 && w.numel() == H && w.is_floating_point(), op, "head_weights",
                  w, "a 1-D floating tensor with one weight per head (" + std::to_string(H) + ")");
    check_same_device(op, "head_weights", w, first);
    plan.head_weights = as_contiguous(w, plan.acc);
  }
  if (class_weights.has_value() && class_weights->defined()) {
    const at::Tensor& w = *class_weights;
    M3D_CHECK_ARG(w.dim() == 1 && w.numel() == total_classes && w.is_floating_point(), op,
                  "class_weights", w,
                  "a 1-D floating tensor of the heads' class weights concatenated (" +
                      std::to_string(total_classes) + " values)");
    check_same_device(op, "class_weights", w, first);
    plan.class_weights = as_contiguous(w, plan.acc);
  }
  int32_t cw = 0;
  plan.heads.reserve(H);
  plan.logits.reserve(H);
  plan.targets.reserve(H);
  for (size_t h = 0; h < logits.size(); ++h) {
    at::Tensor x = logits[h].contiguous(), t = targets[h].contiguous();
    SegHead d{};
    d.n = static_cast<int32_t>(x.size(0));
    d.C = static_cast<int32_t>(x.size(1));
    d.S = 1;
    for (int64_t k = 2; k < x.dim(); ++k) d.S *= x.size(k);
    d.logits = x.const_data_ptr();
    d.target = t.const_data_ptr();
    d.grad = nullptr;
    d.target_u8 = t.scalar_type() == at::kByte;
    d.cw_offset = cw;
    d.tiles_per_sample = (d.S + kSegTile - 1) / kSegTile;
    d.tile_begin = plan.tiles;
    d.slot_begin = plan.slots;
    d.part_begin = plan.parts;
    plan.tiles += d.n * d.tiles_per_sample;
    plan.slots += int64_t(d.n) * d.C;
    plan.parts += d.n * d.tiles_per_sample * (3 * d.C + 2);
    plan.max_c = std::max(plan.max_c, int(d.C));
    cw += d.C;
    plan.heads.push_back(d);
    plan.logits.push_back(std::move(x));
    plan.targets.push_back(std::move(t));
  }
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seg_loss_outputs(const SegPlan& plan,
                                                                           at::Device device) {
  const int64_t H = static_cast<int64_t>(plan.heads.size());
  auto f = at::TensorOptions().device(device).dtype(plan.acc);
  return {at::empty({}, f), at::empty({H}, f),
          at::empty({H, 3}, at::TensorOptions().device(device).dtype(at::kLong)),
          at::empty({3 * plan.slots + H}, f)};
}


at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType st) {
  if (t.scalar_type() == st && t.is_contiguous()) return t;
  return t.to(st).contiguous();
}

std::vector<at::Tensor> seg_loss_backward_outputs(SegPlan& plan, const at::Tensor& saved,
                                                  const c10::optional<at::Tensor>& grad_total,
                                                  const c10::optional<at::Tensor>& grad_per_head,
                                                  SegGrads* grads_in) {
  const char* op = "multihead_seg_loss_backward";
  const int64_t H = static_cast<int64_t>(plan.heads.size());
  const at::Tensor& first = plan.logits[0];
  M3D_CHECK(saved.dim() == 1 && saved.numel() == 3 * plan.slots + H &&
                saved.scalar_type() == plan.acc && saved.is_contiguous(),
            "med3d_ext.multihead_seg_loss_backward: argument 'saved' must be the forward's "
            "contiguous ", plan.acc, " tensor of ", 3 * plan.slots + H,
            " values for these heads, got ", describe(saved));
  check_same_device(op, "saved", saved, first);
  SegGrads g;
  if (grad_total.has_value() && grad_total->defined()) {
    M3D_CHECK_ARG(grad_total->numel() == 1 && grad_total->is_floating_point(), op, "grad_total",
                  *grad_total, "a floating scalar");
    check_same_device(op, "grad_total", *grad_total, first);
    g.total = as_contiguous(*grad_total, plan.acc);
  }
  if (grad_per_head.has_value() && grad_per_head->defined()) {
    const at::Tensor& gp = *grad_per_head;
    M3D_CHECK_ARG(gp.dim() == 1 && gp.numel() == H && gp.is_floating_point(), op,
                  "grad_per_head", gp, "1-D floating with " + std::to_string(H) + " values");
    check_same_device(op, "grad_per_head", gp, first);
    g.per_head = gp.scalar_type() == plan.acc ? gp : gp.to(plan.acc);
    g.ph_stride = g.per_head.stride(0);
  }
  std::vector<at::Tensor> grads;
  grads.reserve(H);
  for (int64_t h = 0; h < H; ++h) {
    grads.push_back(at::empty(plan.logits[h].sizes(), plan.logits[h].options()));
    plan.heads[h].grad = grads.back().data_ptr();
  }
  *grads_in = std::move(g);
  return grads;
}

}  // namespace med3d_ext
