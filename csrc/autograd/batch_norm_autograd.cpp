// Autograd kernels of the bnorm_ext ops, for every backend: the ops are
// differentiable as torch.ops.bnorm_ext.* themselves (reverse mode, forward
// mode, higher orders), so no Python wrapper decides what gets recorded.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "../batch_norm_args.h"
#include "batch_norm_autograd_common.h"

#include <optional>
#include <tuple>
#include <vector>

namespace bnorm_ext {
namespace autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ForwardTrainFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    std::optional<double>,
    double);
using ForwardEvalFn = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, double);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&,
    const Tensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    bool,
    double);
using ForwardJvpFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const Tensor&,
    const Tensor&,
    bool);

Tensor defined_or_empty(const OptTensor& t) {
  return t.has_value() ? *t : Tensor();
}

Tensor tangent(const Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : Tensor();
}

Tensor primal(const Tensor& t) {
  return t.defined() ? t._fw_primal(/*level=*/0) : Tensor();
}

Tensor per_channel(const Tensor& t, int64_t dim) {
  std::vector<c10::SymInt> shape(dim, 1);
  shape[1] = t.sym_numel();
  return t.reshape_symint(shape);
}

c10::Scalar reduce_count(const Tensor& input) {
  const c10::SymInt channels = input.sym_size(1);
  return c10::Scalar(channels == 0 ? c10::SymInt(1) : input.sym_numel() / channels);
}

std::vector<int64_t> reduce_dims(int64_t dim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < dim; ++d) {
    dims.push_back(d);
  }
  return dims;
}

// Forward-mode derivative of y = (x - mean) * invstd * weight + bias, where in
// training mean and invstd are the batch statistics of x (so they move with x)
// and in eval they are constants. input: (N, C, *); mean, invstd: [C]; the
// tangents have their primal's shape (undefined = zero). Returns the tangents
// of y (input dtype), of mean and of invstd ([C], mean's dtype; zero in eval).
// Composite of differentiable ATen ops, so it nests under every transform.
std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_jvp(
    const Tensor& input,
    const OptTensor& input_t,
    const OptTensor& weight,
    const OptTensor& weight_t,
    const OptTensor& bias_t,
    const Tensor& mean,
    const Tensor& invstd,
    bool training) {
  const auto acc = acc_scalar_type(input.scalar_type());
  const int64_t dim = input.dim();
  const Tensor x = input.to(acc);
  const Tensor mean_c = per_channel(mean.to(acc), dim);
  const Tensor invstd_c = per_channel(invstd.to(acc), dim);
  const Tensor xhat = (x - mean_c) * invstd_c;
  Tensor mean_tangent = at::zeros_like(mean);
  Tensor invstd_tangent = at::zeros_like(invstd);
  Tensor out_t;
  if (input_t.has_value() && input_t->defined()) {
    const Tensor dx = input_t->to(acc);
    Tensor xhat_t;
    if (training) {
      // NB: d invstd = -invstd^3 * mean((x - mean) dx) = -invstd^2 * mean(xhat dx).
      const auto dims = reduce_dims(dim);
      const Tensor dmean = dx.mean(dims);
      const Tensor xhat_dx = (xhat * dx).mean(dims);
      xhat_t = (dx - per_channel(dmean, dim) - xhat * per_channel(xhat_dx, dim)) * invstd_c;
      mean_tangent = dmean.to(mean.scalar_type());
      invstd_tangent = (-(invstd.to(acc) * invstd.to(acc)) * xhat_dx).to(invstd.scalar_type());
    } else {
      xhat_t = dx * invstd_c;
    }
    out_t = (weight.has_value() && weight->defined()) ? xhat_t * per_channel(weight->to(acc), dim) : xhat_t;
  }
  if (weight_t.has_value() && weight_t->defined()) {
    const Tensor term = xhat * per_channel(weight_t->to(acc), dim);
    out_t = out_t.defined() ? out_t + term : term;
  }
  if (bias_t.has_value() && bias_t->defined()) {
    const Tensor term = per_channel(bias_t->to(acc), dim);
    out_t = out_t.defined() ? out_t + term : term.expand_as(x);
  }
  if (!out_t.defined()) {
    out_t = at::zeros_like(x);
  }
  return {out_t.to(input.scalar_type()), mean_tangent, invstd_tangent};
}

// The input/weight/bias gradients of batch normalization written as a
// composite of differentiable ATen ops: what batch_norm_backward computes when
// its own result is differentiated (double backward, forward AD of the
// backward). In training, mean/invstd are the saved batch statistics; their
// dependence on the input is carried by their own autograd history.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_composite(
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps) {
  const auto acc = acc_scalar_type(input.scalar_type());
  const int64_t dim = input.dim();
  const auto dims = reduce_dims(dim);
  const Tensor x = input.to(acc);
  const Tensor g = grad_out.to(acc);
  const Tensor mean = training ? save_mean->to(acc) : running_mean->to(acc);
  const Tensor invstd = training ? save_invstd->to(acc) : at::rsqrt(running_var->to(acc) + eps);
  const Tensor xhat = (x - per_channel(mean, dim)) * per_channel(invstd, dim);
  const Tensor grad_bias = g.sum(dims);
  const Tensor grad_weight = (g * xhat).sum(dims);
  const bool has_weight = weight.has_value() && weight->defined();
  const Tensor scale = has_weight ? invstd * weight->to(acc) : invstd;
  Tensor grad_input;
  if (training) {
    grad_input = per_channel(scale, dim) *
                 (g - (per_channel(grad_bias, dim) + xhat * per_channel(grad_weight, dim)) / reduce_count(input));
  } else {
    grad_input = g * per_channel(scale, dim);
  }
  const auto param_type = has_weight ? weight->scalar_type() : acc;
  return {grad_input.to(input.scalar_type()), grad_weight.to(param_type), grad_bias.to(param_type)};
}

bool any_tangent(std::initializer_list<Tensor> tensors) {
  for (const auto& t : tensors) {
    if (tangent(t).defined()) {
      return true;
    }
  }
  return false;
}

Tensor grad_input_from_stats(
    const Tensor& input, const Tensor& mean, const Tensor& invstd, const Tensor& grad_mean, const Tensor& grad_invstd) {
  if (!grad_mean.defined() && !grad_invstd.defined()) {
    return Tensor();
  }
  // d mean / dx = 1 / M; d invstd / dx = -invstd^3 (x - mean) / M.
  const auto acc = acc_scalar_type(input.scalar_type());
  const int64_t dim = input.dim();
  const c10::Scalar count = reduce_count(input);
  Tensor from_stats = at::zeros_like(input, acc);
  if (grad_mean.defined()) {
    from_stats = from_stats + per_channel(grad_mean.to(acc), dim) / count;
  }
  if (grad_invstd.defined()) {
    const Tensor invstd_acc = invstd.to(acc);
    from_stats = from_stats - per_channel(grad_invstd.to(acc) * invstd_acc * invstd_acc * invstd_acc, dim) *
                                  (input.to(acc) - per_channel(mean.to(acc), dim)) / count;
  }
  return from_stats.to(input.scalar_type());
}

// Backward node of the two forward ops. Training: saved batch statistics
// (outputs 1 and 2 of the op, differentiable too); eval: running statistics.
struct BatchNormBackward final : public Node {
  BatchNormBackward(bool training, double eps, bool has_weight)
      : training_(training), eps_(eps), has_weight_(has_weight) {}

  std::string name() const override {
    return training_ ? "BatchNormForwardTrainBackward" : "BatchNormForwardEvalBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    invstd_or_var_.reset_data();
  }

  // grads: d output (and in training d save_mean, d save_invstd); returns the
  // gradients of input, weight, bias.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    static auto backward_op = op_handle<BackwardFn>("bnorm_ext::batch_norm_backward");
    const Tensor input = input_.unpack();
    const Tensor weight = weight_.unpack();
    const Tensor mean = mean_.unpack(getptr());
    const Tensor invstd_or_var = invstd_or_var_.unpack(getptr());
    const OptTensor weight_opt = has_weight_ ? OptTensor(weight) : std::nullopt;
    Tensor grad_input, grad_weight, grad_bias;
    if (grads[0].defined()) {
      std::tie(grad_input, grad_weight, grad_bias) =
          training_ ? backward_op.call(
                          grads[0], input, weight_opt, std::nullopt, std::nullopt, mean, invstd_or_var, true, eps_)
                    : backward_op.call(
                          grads[0], input, weight_opt, mean, invstd_or_var, std::nullopt, std::nullopt, false, eps_);
    }
    if (training_ && grads.size() > 1) {
      const Tensor from_stats = grad_input_from_stats(input, mean, invstd_or_var, grads[1], grads[2]);
      if (from_stats.defined()) {
        grad_input = grad_input.defined() ? grad_input + from_stats : from_stats;
      }
    }
    return {
        task_should_compute_output(0) ? grad_input : Tensor(),
        has_weight_ && task_should_compute_output(1) ? grad_weight : Tensor(),
        task_should_compute_output(2) ? grad_bias : Tensor()};
  }

  bool training_;
  double eps_;
  bool has_weight_;
  SavedVariable input_;
  SavedVariable weight_;
  SavedVariable mean_;           // training: save_mean (an output); eval: running_mean
  SavedVariable invstd_or_var_;  // training: save_invstd (an output); eval: running_var
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_train_autograd(
    c10::DispatchKeySet ks,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  static auto op = op_handle<ForwardTrainFn>("bnorm_ext::batch_norm_forward_train");
  const Tensor w = defined_or_empty(weight);
  const Tensor b = defined_or_empty(bias);
  NodePtr<BatchNormBackward> grad_fn;
  if (torch::autograd::compute_requires_grad(input, w, b)) {
    grad_fn = make_node<BatchNormBackward>(/*training=*/true, eps, w.defined());
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  }
  Tensor output, save_mean, save_invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, save_mean, save_invstd) = op.redispatch(
        ks & c10::after_autograd_keyset, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
        eps);
  }
  // NB: tangents first: a SavedVariable keeps the tangent its tensor has when saved.
  if (any_tangent({input, w, b})) {
    auto [output_t, mean_t, invstd_t] = batch_norm_forward_jvp(
        primal(input), tangent(input), primal(w), tangent(w), tangent(b), save_mean, save_invstd, true);
    output._set_fw_grad(output_t, /*level=*/0, /*is_inplace_op=*/false);
    save_mean._set_fw_grad(mean_t, /*level=*/0, /*is_inplace_op=*/false);
    save_invstd._set_fw_grad(invstd_t, /*level=*/0, /*is_inplace_op=*/false);
  }
  if (grad_fn) {
    torch::autograd::set_history(output, grad_fn);
    torch::autograd::set_history(save_mean, grad_fn);
    torch::autograd::set_history(save_invstd, grad_fn);
    grad_fn->input_ = SavedVariable(input, false);
    grad_fn->weight_ = SavedVariable(w, false);
    grad_fn->mean_ = SavedVariable(save_mean, true);
    grad_fn->invstd_or_var_ = SavedVariable(save_invstd, true);
  }
  return {output, save_mean, save_invstd};
}

Tensor batch_norm_forward_eval_autograd(
    c10::DispatchKeySet ks,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps) {
  static auto op = op_handle<ForwardEvalFn>("bnorm_ext::batch_norm_forward_eval");
  const Tensor w = defined_or_empty(weight);
  const Tensor b = defined_or_empty(bias);
  NodePtr<BatchNormBackward> grad_fn;
  if (torch::autograd::compute_requires_grad(input, w, b)) {
    grad_fn = make_node<BatchNormBackward>(/*training=*/false, eps, w.defined());
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  }
  Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    output = op.redispatch(ks & c10::after_autograd_keyset, input, weight, bias, running_mean, running_var, eps);
  }
  if (grad_fn) {
    torch::autograd::set_history(output, grad_fn);
    grad_fn->input_ = SavedVariable(input, false);
    grad_fn->weight_ = SavedVariable(w, false);
    grad_fn->mean_ = SavedVariable(running_mean, false);
    grad_fn->invstd_or_var_ = SavedVariable(running_var, false);
  }
  if (any_tangent({input, w, b})) {
    const Tensor invstd = at::rsqrt(primal(running_var).to(acc_scalar_type(input.scalar_type())) + eps);
    auto output_t = std::get<0>(batch_norm_forward_jvp(
        primal(input), tangent(input), primal(w), tangent(w), tangent(b), primal(running_mean), invstd, false));
    output._set_fw_grad(output_t, /*level=*/0, /*is_inplace_op=*/false);
  }
  return output;
}

// The backward op is differentiable through its composite form; the kernel
// runs whenever nothing needs its derivative.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_autograd(
    c10::DispatchKeySet ks,
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps) {
  static auto op = op_handle<BackwardFn>("bnorm_ext::batch_norm_backward");
  const Tensor w = defined_or_empty(weight);
  const Tensor sm = defined_or_empty(save_mean);
  const Tensor si = defined_or_empty(save_invstd);
  const Tensor rm = defined_or_empty(running_mean);
  const Tensor rv = defined_or_empty(running_var);
  if (torch::autograd::compute_requires_grad(grad_out, input, w, sm, si, rm, rv) ||
      any_tangent({grad_out, input, w, sm, si, rm, rv})) {
    // Same argument checks as the kernel before the composite runs.
    if (training) {
      TORCH_CHECK(
          save_mean.has_value() && save_invstd.has_value(),
          "bnorm_ext::batch_norm_backward: training=True needs save_mean and save_invstd");
    } else {
      TORCH_CHECK(
          running_mean.has_value() && running_var.has_value(),
          "bnorm_ext::batch_norm_backward: training=False needs running_mean and running_var");
    }
    return batch_norm_backward_composite(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(
      ks & c10::after_autograd_keyset, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
      training, eps);
}

TORCH_LIBRARY_IMPL(bnorm_ext, Autograd, m) {
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_autograd);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
  // The SyncBatchNorm building blocks are differentiated by SyncBatchNormFunction;
  // called directly, they raise when a derivative (reverse or forward) is needed.
  for (const char* name :
       {"batch_norm_stats", "batch_norm_gather_stats", "batch_norm_elemt", "batch_norm_backward_reduce",
        "batch_norm_backward_elemt"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(bnorm_ext, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_forward_jvp", &batch_norm_forward_jvp);
}

}  // namespace autograd
}  // namespace bnorm_ext
