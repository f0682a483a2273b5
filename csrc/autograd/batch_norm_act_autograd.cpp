// Autograd kernels of the fused ops y = act(BN(x) + residual), the same
// design as batch_norm_autograd.cpp: the ops are differentiable as they are
// (reverse mode through a Node, forward mode through an ATen composite), and
// the backward op is differentiable through its ATen composite.
//
// Saved for backward, as torch's composed BN -> add -> act saves: input,
// weight and the statistics (as BN does); for relu/leaky_relu the output (as
// relu does), for silu bias and the residual instead (silu saves its own
// input, the pre-activation, which is recomputed from them).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <functional>
#include <string>
#include <string_view>

#include "../batch_norm_args.h"
#include "batch_norm_autograd_common.h"

namespace bnorm_ext {
namespace autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ActForwardTrainFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    std::optional<double>,
    double,
    const OptTensor&,
    std::string_view,
    double);
using ActForwardEvalFn = Tensor(
    const Tensor&,
    const OptTensor&,
    const OptTensor&,
    const Tensor&,
    const Tensor&,
    double,
    const OptTensor&,
    std::string_view,
    double);
using ActBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&,
    const OptTensor&,
    const Tensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    const OptTensor&,
    bool,
    double,
    bool,
    std::string_view,
    double);

namespace {

OptTensor opt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// The pre-activation z = BN(x) + residual in the acc dtype, from the
// statistics the forward normalized with. Composite, differentiable in all.
Tensor pre_activation(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& residual) {
  const auto acc = acc_scalar_type(input.scalar_type());
  const int64_t dim = input.dim();
  Tensor z = (input.to(acc) - per_channel(mean.to(acc), dim)) * per_channel(invstd.to(acc), dim);
  if (given(weight)) {
    z = z * per_channel(weight->to(acc), dim);
  }
  if (given(bias)) {
    z = z + per_channel(bias->to(acc), dim);
  }
  if (given(residual)) {
    z = z + residual->to(acc);
  }
  return z;
}

// act'(z) * g for a g of z's shape (the reverse and the forward derivative
// alike: the activation is elementwise). relu/leaky_relu read the sign from
// output (y > 0 exactly when z > 0); silu needs z. Composite; acc dtype.
Tensor activation_derivative_times(
    const Tensor& g, Activation act, double negative_slope, const Tensor& output, const std::function<Tensor()>& z) {
  switch (act) {
    case Activation::kRelu:
      // NB: a NaN output passes g, as threshold_backward.
      return at::where(output.le(0), c10::Scalar(0.0), g);
    case Activation::kLeakyRelu:
      return at::where(output.gt(0), g, g * negative_slope);
    case Activation::kSilu: {
      const Tensor zv = z();
      const Tensor sig = at::sigmoid(zv);
      return g * sig * (1 + zv * (1 - sig));
    }
    case Activation::kIdentity:
      break;
  }
  return g;
}

// batch_norm_act_backward as a composite of differentiable ATen ops (double
// backward, forward AD of the backward); the statistics carry their own
// autograd history, as in batch_norm_backward_composite.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_composite(
    const Tensor& grad_out,
    const OptTensor& output,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    const OptTensor& residual,
    bool training,
    double eps,
    bool need_grad_residual,
    Activation act,
    double negative_slope) {
  const auto acc = acc_scalar_type(input.scalar_type());
  const Tensor g = grad_out.to(acc);
  const Tensor dz = activation_derivative_times(g, act, negative_slope, defined_or_empty(output), [&] {
    const Tensor mean = training ? *save_mean : *running_mean;
    const Tensor invstd = training ? *save_invstd : at::rsqrt(running_var->to(acc) + eps);
    return pre_activation(input, weight, bias, mean, invstd, residual);
  });
  auto [grad_input, grad_weight, grad_bias] = batch_norm_backward_composite(
      dz, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  const Tensor grad_residual = need_grad_residual ? dz.to(input.scalar_type()) : at::empty({0}, input.options());
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// Tangent of the fused output from the tangent of BN's output (bn_t, acc or
// input dtype) and the residual's.
Tensor act_output_tangent(
    const Tensor& bn_t,
    const Tensor& residual_t,
    Activation act,
    double negative_slope,
    const Tensor& output,
    const std::function<Tensor()>& z) {
  Tensor z_t = bn_t.to(acc_scalar_type(output.scalar_type()));
  if (residual_t.defined()) {
    z_t = z_t + residual_t.to(z_t.scalar_type());
  }
  return activation_derivative_times(z_t, act, negative_slope, output, z).to(output.scalar_type());
}

}  // namespace

// Backward node of the two fused forward ops. Training: the saved batch
// statistics (outputs 1 and 2, differentiable too); eval: running statistics.
struct BatchNormActBackward final : public Node {
  BatchNormActBackward(
      bool training,
      double eps,
      bool has_weight,
      bool has_bias,
      bool has_residual,
      Activation act,
      std::string activation,
      double negative_slope)
      : training_(training),
        eps_(eps),
        has_weight_(has_weight),
        has_bias_(has_bias),
        has_residual_(has_residual),
        act_(act),
        activation_(std::move(activation)),
        negative_slope_(negative_slope) {}

  std::string name() const override {
    return training_ ? "BatchNormActForwardTrainBackward" : "BatchNormActForwardEvalBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    bias_.reset_data();
    mean_.reset_data();
    invstd_or_var_.reset_data();
    output_.reset_data();
    residual_.reset_data();
  }

  // grads: d output (and in training d save_mean, d save_invstd); returns the
  // gradients of input, weight, bias, residual.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    static auto backward_op = op_handle<ActBackwardFn>("bnorm_ext::batch_norm_act_backward");
    const Tensor input = input_.unpack();
    const Tensor weight = weight_.unpack();
    const Tensor bias = bias_.unpack();
    const Tensor mean = mean_.unpack(getptr());
    const Tensor invstd_or_var = invstd_or_var_.unpack(getptr());
    const Tensor output = output_.unpack(getptr());
    const Tensor residual = residual_.unpack();
    const bool need_grad_residual = has_residual_ && task_should_compute_output(3);
    Tensor grad_input, grad_weight, grad_bias, grad_residual;
    if (grads[0].defined()) {
      std::tie(grad_input, grad_weight, grad_bias, grad_residual) =
          training_ ? backward_op.call(
                          grads[0], opt(output), input, opt(weight), opt(bias), std::nullopt, std::nullopt, mean,
                          invstd_or_var, opt(residual), true, eps_, need_grad_residual, activation_, negative_slope_)
                    : backward_op.call(
                          grads[0], opt(output), input, opt(weight), opt(bias), mean, invstd_or_var, std::nullopt,
                          std::nullopt, opt(residual), false, eps_, need_grad_residual, activation_, negative_slope_);
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
        has_bias_ && task_should_compute_output(2) ? grad_bias : Tensor(),
        need_grad_residual ? grad_residual : Tensor()};
  }

  bool training_;
  double eps_;
  bool has_weight_;
  bool has_bias_;
  bool has_residual_;
  Activation act_;
  std::string activation_;
  double negative_slope_;
  SavedVariable input_;
  SavedVariable weight_;
  SavedVariable bias_;           // silu only
  SavedVariable mean_;           // training: save_mean (an output); eval: running_mean
  SavedVariable invstd_or_var_;  // training: save_invstd (an output); eval: running_var
  SavedVariable output_;         // relu / leaky_relu only
  SavedVariable residual_;       // silu only
};

namespace {

NodePtr<BatchNormActBackward> make_backward_node(
    bool training,
    double eps,
    const Tensor& input,
    const Tensor& w,
    const Tensor& b,
    const Tensor& r,
    Activation act,
    std::string_view activation,
    double negative_slope) {
  if (!torch::autograd::compute_requires_grad(input, w, b, r)) {
    return nullptr;
  }
  auto grad_fn = make_node<BatchNormActBackward>(
      training, eps, w.defined(), b.defined(), r.defined(), act, std::string(activation), negative_slope);
  grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, w, b, r));
  return grad_fn;
}

// What backward reads besides input, weight and the statistics.
void save_activation_inputs(BatchNormActBackward& node, const Tensor& output, const Tensor& b, const Tensor& r) {
  if (node.act_ == Activation::kRelu || node.act_ == Activation::kLeakyRelu) {
    node.output_ = SavedVariable(output, true);
  } else if (node.act_ == Activation::kSilu) {
    node.bias_ = SavedVariable(b, false);
    node.residual_ = SavedVariable(r, false);
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_train_autograd(
    c10::DispatchKeySet ks,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps,
    const OptTensor& residual,
    std::string_view activation,
    double negative_slope) {
  static auto op = op_handle<ActForwardTrainFn>("bnorm_ext::batch_norm_act_forward_train");
  const Activation act = parse_activation("bnorm_ext::batch_norm_act_forward_train", activation, negative_slope);
  const Tensor w = defined_or_empty(weight);
  const Tensor b = defined_or_empty(bias);
  const Tensor r = defined_or_empty(residual);
  auto grad_fn = make_backward_node(true, eps, input, w, b, r, act, activation, negative_slope);
  Tensor output, save_mean, save_invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, save_mean, save_invstd) = op.redispatch(
        ks & c10::after_autograd_keyset, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
        eps, residual, activation, negative_slope);
  }
  // NB: tangents first: a SavedVariable keeps the tangent its tensor has when saved.
  if (any_tangent({input, w, b, r})) {
    auto [bn_t, mean_t, invstd_t] = batch_norm_forward_jvp(
        primal(input), tangent(input), primal(w), tangent(w), tangent(b), save_mean, save_invstd, true);
    const Tensor output_t = act_output_tangent(bn_t, tangent(r), act, negative_slope, output, [&] {
      return pre_activation(primal(input), opt(primal(w)), opt(primal(b)), save_mean, save_invstd, opt(primal(r)));
    });
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
    save_activation_inputs(*grad_fn, output, b, r);
  }
  return {output, save_mean, save_invstd};
}

Tensor batch_norm_act_forward_eval_autograd(
    c10::DispatchKeySet ks,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps,
    const OptTensor& residual,
    std::string_view activation,
    double negative_slope) {
  static auto op = op_handle<ActForwardEvalFn>("bnorm_ext::batch_norm_act_forward_eval");
  const Activation act = parse_activation("bnorm_ext::batch_norm_act_forward_eval", activation, negative_slope);
  const Tensor w = defined_or_empty(weight);
  const Tensor b = defined_or_empty(bias);
  const Tensor r = defined_or_empty(residual);
  auto grad_fn = make_backward_node(false, eps, input, w, b, r, act, activation, negative_slope);
  Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    output = op.redispatch(
        ks & c10::after_autograd_keyset, input, weight, bias, running_mean, running_var, eps, residual, activation,
        negative_slope);
  }
  if (grad_fn) {
    torch::autograd::set_history(output, grad_fn);
    grad_fn->input_ = SavedVariable(input, false);
    grad_fn->weight_ = SavedVariable(w, false);
    grad_fn->mean_ = SavedVariable(running_mean, false);
    grad_fn->invstd_or_var_ = SavedVariable(running_var, false);
    save_activation_inputs(*grad_fn, output, b, r);
  }
  if (any_tangent({input, w, b, r})) {
    const Tensor invstd = at::rsqrt(primal(running_var).to(acc_scalar_type(input.scalar_type())) + eps);
    const Tensor bn_t = std::get<0>(batch_norm_forward_jvp(
        primal(input), tangent(input), primal(w), tangent(w), tangent(b), primal(running_mean), invstd, false));
    const Tensor output_t = act_output_tangent(bn_t, tangent(r), act, negative_slope, output, [&] {
      return pre_activation(
          primal(input), opt(primal(w)), opt(primal(b)), primal(running_mean), invstd, opt(primal(r)));
    });
    output._set_fw_grad(output_t, /*level=*/0, /*is_inplace_op=*/false);
  }
  return output;
}

// Differentiable through its composite; the kernel runs whenever nothing
// needs the derivative of its results.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_autograd(
    c10::DispatchKeySet ks,
    const Tensor& grad_out,
    const OptTensor& output,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    const OptTensor& residual,
    bool training,
    double eps,
    bool need_grad_residual,
    std::string_view activation,
    double negative_slope) {
  static auto op = op_handle<ActBackwardFn>("bnorm_ext::batch_norm_act_backward");
  const char* name = "bnorm_ext::batch_norm_act_backward";
  const Tensor y = defined_or_empty(output);
  const Tensor w = defined_or_empty(weight);
  const Tensor b = defined_or_empty(bias);
  const Tensor sm = defined_or_empty(save_mean);
  const Tensor si = defined_or_empty(save_invstd);
  const Tensor rm = defined_or_empty(running_mean);
  const Tensor rv = defined_or_empty(running_var);
  const Tensor r = defined_or_empty(residual);
  if (torch::autograd::compute_requires_grad(grad_out, y, input, w, b, sm, si, rm, rv, r) ||
      any_tangent({grad_out, y, input, w, b, sm, si, rm, rv, r})) {
    // Same argument checks as the kernel before the composite runs.
    const Activation act = parse_activation(name, activation, negative_slope);
    if (training) {
      TORCH_CHECK(
          save_mean.has_value() && save_invstd.has_value(), name, ": training=True needs save_mean and save_invstd");
    } else {
      TORCH_CHECK(
          running_mean.has_value() && running_var.has_value(), name,
          ": training=False needs running_mean and running_var");
    }
    TORCH_CHECK(
        !(act == Activation::kRelu || act == Activation::kLeakyRelu) || y.defined(), name, ": activation '",
        std::string(activation), "' reads its derivative from output, which is None");
    TORCH_CHECK(
        !w.defined() || !b.defined() || w.scalar_type() == b.scalar_type(), name,
        ": expected bias to have the same dtype as weight (", w.scalar_type(), "), got ", b.scalar_type());
    check_like_input(name, "output", input, output);
    check_like_input(name, "residual", input, residual);
    // NB: only silu reads the residual (its pre-activation).
    return batch_norm_act_backward_composite(
        grad_out, output, input, weight, bias, running_mean, running_var, save_mean, save_invstd,
        act == Activation::kSilu ? residual : std::nullopt, training, eps, need_grad_residual, act, negative_slope);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(
      ks & c10::after_autograd_keyset, grad_out, output, input, weight, bias, running_mean, running_var, save_mean,
      save_invstd, residual, training, eps, need_grad_residual, activation, negative_slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, Autograd, m) {
  m.impl("batch_norm_act_forward_train", &batch_norm_act_forward_train_autograd);
  m.impl("batch_norm_act_forward_eval", &batch_norm_act_forward_eval_autograd);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_autograd);
}

}  // namespace autograd
}  // namespace bnorm_ext
