// CPU kernels of the fused forward ops y = act(BN(x) + residual): the plain
// statistics pass, then the residual add and the activation in the normalize pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string_view>
#include <type_traits>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"
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

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_train_cpu(
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
  const char* op = "bnorm_ext::batch_norm_act_forward_train";
  const BatchNormShape s =
      check_train_args(op, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  const Activation act = parse_activation(op, activation, negative_slope);
  check_like_input(op, "residual", input, residual);
  const Tensor x = dense_input(input);
  const Tensor res = dense_like_input(residual, input);
  Tensor out = at::empty_like(input, output_memory_format(input));
  const bool channel_fused = use_channel_fused_path(s, res.defined() ? 2 : 1, input.element_size());
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  const std::vector<double> b = param_values(bias, s.C, 0.0);
  std::vector<Stats> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_forward_train_cpu", [&] {
    with_activation(act, [&](auto a) {
      stats = BNORM_EXT_CPU_DISPATCH(
          act_forward_train<scalar_t, decltype(a)::value>(
              x, data_or_null<scalar_t>(res), out, s, w, b, eps, negative_slope, channel_fused));
    });
  });
  update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
  auto [save_mean, save_invstd] = saved_stats(channel_moments(stats, eps), input);
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_act_forward_eval_cpu(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps,
    const OptTensor& residual,
    std::string_view activation,
    double negative_slope) {
  const char* op = "bnorm_ext::batch_norm_act_forward_eval";
  const BatchNormShape s = check_eval_args(op, input, weight, bias, running_mean, running_var, eps);
  const Activation act = parse_activation(op, activation, negative_slope);
  check_like_input(op, "residual", input, residual);
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const Tensor res = dense_like_input(residual, input);
  const std::vector<double> mean = param_values(running_mean, s.C, 0.0);
  std::vector<double> invstd = param_values(running_var, s.C, 1.0);
  for (double& v : invstd) {
    v = invstd_from_var(v, eps);
  }
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  const std::vector<double> b = param_values(bias, s.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_forward_eval_cpu", [&] {
    with_activation(act, [&](auto a) {
      BNORM_EXT_CPU_DISPATCH(
          act_normalize<scalar_t, decltype(a)::value>(
              x, data_or_null<scalar_t>(res), out, s, mean, invstd, w, b, negative_slope));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CPU, m) {
  m.impl("batch_norm_act_forward_train", &batch_norm_act_forward_train_cpu);
  m.impl("batch_norm_act_forward_eval", &batch_norm_act_forward_eval_cpu);
}

}  // namespace cpu
}  // namespace bnorm_ext
