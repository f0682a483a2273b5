// The fused ops y = act(BN(x) + residual) on CUDA, NOT fused yet: each is a
// composite of the CUDA bnorm_ext ops and ATen's add/activation ops, so it is
// correct but makes the separate passes torch's composed BN -> add -> act
// makes. Fused CUDA kernels are to replace these registrations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <tuple>

#include "../autograd/batch_norm_autograd_common.h"
#include "../batch_norm_checks.h"

namespace bnorm_ext {
namespace cuda {
namespace {

using ForwardTrainFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    std::optional<double>, double);
using ForwardEvalFn = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, double);
using ElemtFn = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, bool, double);

using autograd::op_handle;

// z <- act(z + residual), in place on the op's own output.
void add_and_activate_(Tensor& z, const OptTensor& residual, Activation act, double negative_slope) {
  if (given(residual)) {
    z.add_(*residual);
  }
  switch (act) {
    case Activation::kRelu:
      at::relu_(z);
      break;
    case Activation::kLeakyRelu:
      at::leaky_relu_(z, negative_slope);
      break;
    case Activation::kSilu:
      at::silu_(z);
      break;
    case Activation::kIdentity:
      break;
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_train_cuda(
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
  static auto forward_op = op_handle<ForwardTrainFn>("bnorm_ext::batch_norm_forward_train");
  const char* op = "bnorm_ext::batch_norm_act_forward_train";
  // NB: these checks first: the op below updates the running statistics.
  const Activation act = parse_activation(op, activation, negative_slope);
  check_like_input(op, "residual", input, residual);
  auto [out, save_mean, save_invstd] =
      forward_op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  add_and_activate_(out, residual, act, negative_slope);
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_act_forward_eval_cuda(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps,
    const OptTensor& residual,
    std::string_view activation,
    double negative_slope) {
  static auto forward_op = op_handle<ForwardEvalFn>("bnorm_ext::batch_norm_forward_eval");
  const char* op = "bnorm_ext::batch_norm_act_forward_eval";
  const Activation act = parse_activation(op, activation, negative_slope);
  check_like_input(op, "residual", input, residual);
  Tensor out = forward_op.call(input, weight, bias, running_mean, running_var, eps);
  add_and_activate_(out, residual, act, negative_slope);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cuda(
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
  static auto backward_op = op_handle<BackwardFn>("bnorm_ext::batch_norm_backward");
  static auto elemt_op = op_handle<ElemtFn>("bnorm_ext::batch_norm_elemt");
  const char* op = "bnorm_ext::batch_norm_act_backward";
  const BatchNormShape s = check_backward_args(
      op, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  check_params(op, input, s.C, {{"weight", &weight}, {"bias", &bias}});
  const Activation act = parse_activation(op, activation, negative_slope);
  TORCH_CHECK(
      !(act == Activation::kRelu || act == Activation::kLeakyRelu) || given(output),
      op, ": activation '", std::string(activation), "' reads its derivative from output, which is None");
  check_like_input(op, "output", input, output);
  check_like_input(op, "residual", input, residual);
  // NB: every operand in the input's dense layout, so dz (and the residual's
  // gradient) come out in it whatever strides grad_out has, as the CPU kernel's
  // and the fake kernel's outputs do.
  const auto format = output_memory_format(input);
  const Tensor dy = grad_out.contiguous(format);
  const Tensor y = given(output) ? output->contiguous(format) : Tensor();
  Tensor dz;
  switch (act) {
    case Activation::kRelu:
      // NB: a NaN output passes the gradient, as torch's relu backward.
      dz = at::where(y.le(0), c10::Scalar(0.0), dy);
      break;
    case Activation::kLeakyRelu:
      dz = at::where(y.gt(0), dy, dy * negative_slope);
      break;
    case Activation::kSilu: {
      const auto acc = acc_scalar_type(input.scalar_type());
      const Tensor mean = training ? *save_mean : running_mean->to(acc);
      const Tensor invstd = training ? *save_invstd : at::rsqrt(running_var->to(acc) + eps);
      Tensor z = elemt_op.call(input, weight, bias, mean, invstd);
      if (given(residual)) {
        z.add_(*residual);
      }
      dz = at::silu_backward(dy, z);
      break;
    }
    case Activation::kIdentity:
      dz = dy;
      break;
  }
  auto [grad_input, grad_weight, grad_bias] =
      backward_op.call(dz, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  Tensor grad_residual = at::empty({0}, input.options());
  if (need_grad_residual) {
    grad_residual = dz.is_same(grad_out) ? dz.clone(format) : dz;
  }
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

} // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_act_forward_train", &batch_norm_act_forward_train_cuda);
  m.impl("batch_norm_act_forward_eval", &batch_norm_act_forward_eval_cuda);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
}

} // namespace cuda
} // namespace bnorm_ext
