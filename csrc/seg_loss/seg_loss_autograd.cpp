// Autograd of multihead_seg_loss, registered in C++ for both devices (see seg_loss.h).
//
// Why not torch.library.register_autograd from Python like the other ops: this op is a few
// microseconds of GPU work, so its cost is host time. The Python route (an autograd.Function,
// the registered Python autograd kernel, materialised zero gradients for the unused outputs,
// a Python backward) cost ~45 of the ~70 us per forward + backward measured on the CPU; here the
// forward node and the backward are plain C++ and the backward is exactly one op call.
// torch.compile traces this kernel like any C++ autograd (AOTAutograd runs it on fake tensors).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "seg_loss.h"

namespace med3d_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    at::TensorList, at::TensorList, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, double, double, double, int64_t);
using BackwardSig = std::vector<at::Tensor>(
    at::TensorList, at::TensorList, const at::Tensor&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, int64_t);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("med3d_ext::multihead_seg_loss", "")
                             .typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("med3d_ext::multihead_seg_loss_backward", "")
                             .typed<BackwardSig>();
  return op;
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class SegLossFunction : public torch::autograd::Function<SegLossFunction> {
 public:
  // Saved: logits[H], targets[H], saved, per_head, head_weights?, class_weights? (undefined
  // tensors stand for None).
  static variable_list forward(AutogradContext* ctx, at::TensorList logits,
                               at::TensorList targets,
                               const c10::optional<at::Tensor>& head_weights,
                               const c10::optional<at::Tensor>& class_weights, double ce_weight,
                               double dice_weight, double smooth, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [total, per_head, bad, saved] = forward_op().call(
        logits, targets, head_weights, class_weights, ce_weight, dice_weight, smooth,
        ignore_index);
    const size_t H = logits.size();
    variable_list keep;
    keep.reserve(2 * H + 4);
    keep.insert(keep.end(), logits.begin(), logits.end());
    keep.insert(keep.end(), targets.begin(), targets.end());
    keep.push_back(saved);
    keep.push_back(per_head);
    keep.push_back(head_weights.has_value() ? *head_weights : at::Tensor());
    keep.push_back(class_weights.has_value() ? *class_weights : at::Tensor());
    ctx->save_for_backward(keep);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({bad, saved});
    ctx->set_materialize_grads(false);  // unused outputs: undefined gradients, no zero tensors
    return {total, per_head, bad, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    // The backward op has no derivative of its own: refuse create_graph rather than return
    // gradients that silently do not track the logits (a Hessian-vector product lost this
    // loss's second-order term).
    TORCH_CHECK(!at::GradMode::is_enabled(), "med3d_ext.multihead_seg_loss: double backward "
                "(create_graph=True) is not supported; use med3d_ext.reference.multihead_seg_loss "
                "for higher-order gradients");
    const variable_list sv = ctx->get_saved_variables();
    const size_t H = (sv.size() - 4) / 2;
    const at::Tensor& per_head = sv[2 * H + 1];
    const at::Tensor& hw = sv[2 * H + 2];
    const at::Tensor& gt = grad_out[0];
    const at::Tensor& gp = grad_out[1];
    // One gradient slot per forward argument: logits[H], targets[H], head_weights,
    // class_weights and the four scalars; edges exist only for tensors, in that order.
    variable_list grads(2 * H + 6);
    bool need_logits = false;
    for (size_t h = 0; h < H; ++h) need_logits = need_logits || ctx->needs_input_grad(h);
    if (need_logits && (gt.defined() || gp.defined())) {
      // Straight to the device kernel: the backward op has no autograd of its own (once
      // differentiable), and the dispatcher's boxed autograd fallback would cost microseconds.
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<at::Tensor> g = backward_op().call(
          at::TensorList(sv.data(), H), at::TensorList(sv.data() + H, H), sv[2 * H], opt(gt),
          opt(gp), opt(hw), opt(sv[2 * H + 3]), ctx->saved_data["ignore_index"].toInt());
      for (size_t h = 0; h < H; ++h) grads[h] = std::move(g[h]);
    }
    // d total / d head_weights[h] = per_head[h]; an edge index 2H exists only with weights.
    if (hw.defined() && gt.defined() && ctx->needs_input_grad(2 * H))
      grads[2 * H] = (gt * per_head).to(hw.scalar_type());
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multihead_seg_loss_autograd(
    at::TensorList logits, at::TensorList targets, const c10::optional<at::Tensor>& head_weights,
    const c10::optional<at::Tensor>& class_weights, double ce_weight, double dice_weight,
    double smooth, int64_t ignore_index) {
  // Evaluation / no_grad calls skip the node machinery altogether (it is most of the host time).
  bool needs_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& x : logits) needs_grad = needs_grad || x.requires_grad();
    needs_grad = needs_grad || (head_weights.has_value() && head_weights->requires_grad());
  }
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(logits, targets, head_weights, class_weights, ce_weight,
                             dice_weight, smooth, ignore_index);
  }
  variable_list out = SegLossFunction::apply(logits, targets, head_weights, class_weights,
                                             ce_weight, dice_weight, smooth, ignore_index);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, Autograd, m) {
  m.impl("multihead_seg_loss", &multihead_seg_loss_autograd);
}

}  // namespace med3d_ext
