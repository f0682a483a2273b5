// CPU kernels of the fused backward op: one backward that reads dy through the
// activation's derivative inside the plain backward passes, and its `.out` overload.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string_view>
#include <type_traits>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"
#include "../batch_norm_out.h"
#include "batch_norm_cpu.h"
#include "batch_norm_cpu_loops.h"

namespace bnorm_ext {
namespace cpu {

using Stats = WelfordData<double>;
using Sums = GradSums<double>;

inline Sums add(const Sums& a, const Sums& b) {
  return grad_sums_merge(a, b);
}

#define BNORM_EXT_CPU_KERNELS "batch_norm_act_cpu_kernels.inc"
#include "batch_norm_cpu_isa_builds.inc"

namespace {

template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// Per-channel grad_weight and grad_bias values.
struct ActParamGrads {
  std::vector<double> weight, bias;
};

// The fused backward after its checks: writes the input gradient into
// grad_in and, when need_grad_residual, the residual's into grad_res (both
// input-shaped, dense in output_memory_format(input)); returns the parameter
// gradients.
ActParamGrads batch_norm_act_backward_into(
    const BatchNormShape& s,
    Activation act,
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
    double negative_slope,
    Tensor grad_in,
    const Tensor& grad_res) {
  std::vector<double> mean, invstd;
  if (training) {
    mean = param_values(save_mean, s.C, 0.0);
    invstd = param_values(save_invstd, s.C, 0.0);
  } else {
    mean = param_values(running_mean, s.C, 0.0);
    invstd = param_values(running_var, s.C, 0.0);
    for (double& v : invstd) {
      v = invstd_from_var(v, eps);
    }
  }
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  const std::vector<double> b = param_values(bias, s.C, 0.0);
  const Tensor dy = grad_out.contiguous(output_memory_format(input));
  const Tensor x = dense_input(input);
  const std::pair<Tensor, Tensor> read = act_backward_operands(act, output, residual, input);
  const Tensor& y = read.first;
  const Tensor& res = read.second;
  const int64_t tensors_read = 2 + (y.defined() ? 1 : 0) + (res.defined() ? 1 : 0);
  const bool channel_fused = training && use_channel_fused_path(s, tensors_read, input.element_size());
  std::vector<Sums> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_backward_cpu", [&] {
    scalar_t* dres = need_grad_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
    with_activation(act, [&](auto a) {
      sums = BNORM_EXT_CPU_DISPATCH(
          act_backward<scalar_t, decltype(a)::value>(
              dy, data_or_null<scalar_t>(y), x, data_or_null<scalar_t>(res), grad_in, dres, s, mean, invstd, w, b,
              training, negative_slope, channel_fused));
    });
  });
  ActParamGrads grads{std::vector<double>(s.C), std::vector<double>(s.C)};
  for (int64_t c = 0; c < s.C; ++c) {
    grads.weight[c] = sums[c].sum_dy_xmu * invstd[c];
    grads.bias[c] = sums[c].sum_dy;
  }
  return grads;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cpu(
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
  const char* op = "bnorm_ext::batch_norm_act_backward";
  const std::pair<BatchNormShape, Activation> checked = check_act_backward_args(
      op, grad_out, output, input, weight, bias, running_mean, running_var, save_mean, save_invstd, residual, training,
      eps, activation, negative_slope);
  Tensor grad_in = at::empty_like(input, output_memory_format(input));
  Tensor grad_res =
      need_grad_residual ? at::empty_like(input, output_memory_format(input)) : at::empty({0}, input.options());
  const ActParamGrads grads = batch_norm_act_backward_into(
      checked.first, checked.second, grad_out, output, input, weight, bias, running_mean, running_var, save_mean,
      save_invstd, residual, training, eps, need_grad_residual, negative_slope, grad_in, grad_res);
  const auto param_type = param_grad_type(weight, input);
  return {
      grad_in, channel_tensor(grads.weight, input, param_type), channel_tensor(grads.bias, input, param_type),
      grad_res};
}

// batch_norm_act_backward.out: the same values written into the given
// tensors (grad_residual: input-shaped when need_grad_residual, else [0]).
std::tuple<Tensor&, Tensor&, Tensor&, Tensor&> batch_norm_act_backward_out_cpu(
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
    double negative_slope,
    Tensor& grad_input,
    Tensor& grad_weight,
    Tensor& grad_bias,
    Tensor& grad_residual) {
  const char* op = "bnorm_ext::batch_norm_act_backward.out";
  const std::pair<BatchNormShape, Activation> checked = check_act_backward_args(
      op, grad_out, output, input, weight, bias, running_mean, running_var, save_mean, save_invstd, residual, training,
      eps, activation, negative_slope);
  const int64_t C = checked.first.C;
  const auto param_type = param_grad_type(weight, input);
  check_out(op, "grad_input", grad_input, input.sizes(), input.scalar_type(), input);
  check_out(op, "grad_weight", grad_weight, {C}, param_type, input);
  check_out(op, "grad_bias", grad_bias, {C}, param_type, input);
  const std::vector<int64_t> no_residual_grad = {0};
  check_out(
      op, "grad_residual", grad_residual, need_grad_residual ? input.sizes() : at::IntArrayRef(no_residual_grad),
      input.scalar_type(), input);
  const Tensor target = dense_out_target(grad_input, input);
  const Tensor residual_target = need_grad_residual ? dense_out_target(grad_residual, input) : grad_residual;
  const ActParamGrads grads = batch_norm_act_backward_into(
      checked.first, checked.second, grad_out, output, input, weight, bias, running_mean, running_var, save_mean,
      save_invstd, residual, training, eps, need_grad_residual, negative_slope, target, residual_target);
  copy_back(grad_input, target);
  copy_back(grad_residual, residual_target);
  store_values(grad_weight, grads.weight);
  store_values(grad_bias, grads.bias);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CPU, m) {
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("batch_norm_act_backward.out", &batch_norm_act_backward_out_cpu);
}

}  // namespace cpu
}  // namespace bnorm_ext
