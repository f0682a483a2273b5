// CUDA backward kernel of the fused ops y = act(BN(x) + residual): the plain
// backward passes (batch_norm_cuda_passes.cuh) with the activation's
// derivative as the gradient prologue, so dy is read through it: the
// gradient sums (or the single-read kernel) see dz = act'(z) * dy, and the
// elementwise pass writes dx and, when asked, the residual's gradient dz.
// relu / leaky_relu take the derivative from the saved output; silu
// recomputes its pre-activation from the input, the statistics, weight, bias
// and the residual.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <string_view>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_passes.cuh"

namespace bnorm_ext {
namespace cuda {
namespace {

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
  const char* op = "bnorm_ext::batch_norm_act_backward";
  const std::pair<BatchNormShape, Activation> checked = check_act_backward_args(
      op, grad_out, output, input, weight, bias, running_mean, running_var, save_mean, save_invstd, residual, training,
      eps, activation, negative_slope);
  const BatchNormShape& s = checked.first;
  const Activation act = checked.second;
  const auto acc = acc_scalar_type(input.scalar_type());
  c10::cuda::CUDAGuard guard(input.device());
  const std::pair<Tensor, Tensor> stats =
      backward_stats(training, save_mean, save_invstd, running_mean, running_var, eps, acc);
  const Tensor& mean = stats.first;
  const Tensor& invstd = stats.second;
  const auto param_options = input.options().dtype(given(weight) ? weight->scalar_type() : acc);
  Tensor grad_weight = at::zeros({s.C}, param_options);
  Tensor grad_bias = at::zeros({s.C}, param_options);
  Tensor dx = at::empty_like(input, output_memory_format(input));
  Tensor grad_residual =
      need_grad_residual ? at::empty_like(input, output_memory_format(input)) : at::empty({0}, input.options());
  if (input.numel() == 0) {
    return {dx, grad_weight, grad_bias, grad_residual};
  }
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  const std::pair<Tensor, Tensor> read = act_backward_operands(act, output, residual, input);
  const Tensor& y = read.first;
  const Tensor& res = read.second;
  const auto with_prologue = [&](auto scalar_tag, auto param_tag, const auto& run) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    using acc_t = acc_type<scalar_t>;
    scalar_t* dres = need_grad_residual ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    with_activation(act, [&](auto a) {
      constexpr Activation kAct = decltype(a)::value;
      if constexpr (kAct == Activation::kSilu) {
        run(GradThroughSilu<scalar_t, param_t>{
            res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, dres, invstd.const_data_ptr<acc_t>(),
            opt_ptr<param_t>(w), opt_ptr<param_t>(b)});
      } else {
        run(GradFromOutput<scalar_t, kAct>{
            y.defined() ? y.const_data_ptr<scalar_t>() : nullptr, dres, static_cast<acc_t>(negative_slope)});
      }
    });
  };
  // NB: weight and bias share a dtype (checked); only they are read as param_t.
  backward_passes(
      dense_grad(grad_out, input), dense_input(input), dx, s, mean, invstd, w, grad_weight, grad_bias, training,
      param_scalar_type(input, {&weight, &bias}), with_prologue);
  return {dx, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
}

}  // namespace cuda
}  // namespace bnorm_ext
