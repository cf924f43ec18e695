// Argument checks and work layout for multihead_seg_loss, shared by the CPU and CUDA entries.

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
  for (size_t h = 0; h < logits.size(); ++h) {
    const at::Tensor& x = logits[h];
    const at::Tensor& t = targets[h];
    const std::string xa = head_arg("logits", h), ta = head_arg("targets", h);
    M3D_CHECK_ARG(x.defined() && x.dim() >= 2, op, xa.c_str(), x, "(n, C, *spatial)");
    check_float(op, xa.c_str(), x);
    M3D_CHECK_ARG(x.scalar_type() == first.scalar_type(), op, xa.c_str(), x,
                  std::string("of the same dtype as logits[0] (") +
                      c10::toString(first.scalar_type()) + ")");
    check_same_device(op, xa.c_str(), x, first);
    M3D_CHECK_ARG(x.size(1) >= 2, op, xa.c_str(), x,
                  "of at least 2 classes (softmax over C; give a binary head 2 channels)");
    M3D_CHECK_ARG(t.defined() && (t.scalar_type() == at::kByte || t.scalar_type() == at::kLong),
                  op, ta.c_str(), t, "uint8 or int64 class indices");
    check_same_device(op, ta.c_str(), t, first);
    std::vector<int64_t> expect{x.size(0)};
    for (int64_t d = 2; d < x.dim(); ++d) expect.push_back(x.size(d));
    M3D_CHECK(t.sizes().vec() == expect, "med3d_ext.", op, ": head ", h, ": targets shape ",
                t.sizes(), " does not match logits shape ", x.sizes(), " (expected targets ",
                at::IntArrayRef(expect), ")");
    total_classes += x.size(1);
  }
  plan.acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (head_weights.has_value() && head_weights->defined()) {
    const at::Tensor& w = *head_weights;
    M3D_CHECK_ARG(w.dim() == 1 && w.numel() == H && w.is_floating_point(), op, "head_weights",
                  w, "a 1-D floating tensor with one weight per head (" + std::to_string(H) + ")");
    check_same_device(op, "head_weights", w, first);
    plan.head_weights = w.to(plan.acc).contiguous();
  }
  if (class_weights.has_value() && class_weights->defined()) {
    const at::Tensor& w = *class_weights;
    M3D_CHECK_ARG(w.dim() == 1 && w.numel() == total_classes && w.is_floating_point(), op,
                  "class_weights", w,
                  "a 1-D floating tensor of the heads' class weights concatenated (" +
                      std::to_string(total_classes) + " values)");
    check_same_device(op, "class_weights", w, first);
    plan.class_weights = w.to(plan.acc).contiguous();
  }
  int32_t cw = 0;
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


std::vector<at::Tensor> seg_loss_backward_outputs(SegPlan& plan, const at::Tensor& saved,
                                                  const at::Tensor& grad_total,
                                                  const at::Tensor& grad_per_head) {
  const int64_t H = static_cast<int64_t>(plan.heads.size());
  M3D_CHECK(saved.dim() == 1 && saved.numel() == 3 * plan.slots + H,
              "med3d_ext.multihead_seg_loss_backward: argument 'saved' must have ",
              3 * plan.slots + H, " values for these heads, got shape ", saved.sizes());
  M3D_CHECK(grad_total.numel() == 1 && grad_per_head.numel() == H,
              "med3d_ext.multihead_seg_loss_backward: grad_total must be a scalar and "
              "grad_per_head have ", H, " values, got shapes ", grad_total.sizes(), " and ",
              grad_per_head.sizes());
  std::vector<at::Tensor> grads;
  for (size_t h = 0; h < plan.heads.size(); ++h) {
    grads.push_back(at::empty_like(plan.logits[h]));
    plan.heads[h].grad = grads.back().data_ptr();
  }
  return grads;
}

}  // namespace med3d_ext
