// CUDA forward kernels of the fused ops y = act(BN(x) + residual): the plain
// forward passes (batch_norm_cuda_passes.cuh) with ResidualActivation as the
// normalize step's epilogue. Training: the single-read kernel when the input
// fits on chip, else the statistics pass, the finalize (running statistics,
// the plain op's code) and one normalize pass that adds the residual and
// applies the activation before the store; eval: one pass.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_passes.cuh"

namespace bnorm_ext {
namespace cuda {
namespace {

// with_act for the forward passes: ResidualActivation<scalar_t, act> over
// `residual` (dense in the input's layout, or undefined).
auto residual_activation(const Tensor& residual, Activation act, double negative_slope) {
  return [&residual, act, negative_slope](auto scalar_tag, const auto& run) {
    using scalar_t = decltype(scalar_tag);
    const scalar_t* r = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    with_activation(act, [&](auto a) {
      run(ResidualActivation<scalar_t, decltype(a)::value>{r, static_cast<acc_type<scalar_t>>(negative_slope)});
    });
  };
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
  const char* op = "bnorm_ext::batch_norm_act_forward_train";
  // NB: every check before forward_train, which updates the running statistics.
  const BatchNormShape s =
      check_train_args(op, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  const Activation act = parse_activation(op, activation, negative_slope);
  check_like_input(op, "residual", input, residual);
  const Tensor res = dense_like_input(residual, input);
  return forward_train(
      s, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
      residual_activation(res, act, negative_slope));
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
  const char* op = "bnorm_ext::batch_norm_act_forward_eval";
  const BatchNormShape s = check_eval_args(op, input, weight, bias, running_mean, running_var, eps);
  const Activation act = parse_activation(op, activation, negative_slope);
  check_like_input(op, "residual", input, residual);
  const Tensor res = dense_like_input(residual, input);
  return forward_eval(
      s, input, weight, bias, running_mean, running_var, eps, residual_activation(res, act, negative_slope));
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_act_forward_train", &batch_norm_act_forward_train_cuda);
  m.impl("batch_norm_act_forward_eval", &batch_norm_act_forward_eval_cuda);
}

}  // namespace cuda
}  // namespace bnorm_ext
