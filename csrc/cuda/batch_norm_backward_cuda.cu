// CUDA backward ops. Training backward: the single-read kernel when dy and x
// fit on chip, else per-channel gradient sums (one read of dy and x, split
// over the whole GPU, merged in a fixed order) and the vectorised input
// gradient pass. Eval backward: one pass, dx written as the sums read dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_passes.cuh"

namespace bnorm_ext {
namespace cuda {
namespace {

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cuda(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  const char* op = "bnorm_ext::batch_norm_backward_reduce";
  const BatchNormShape s = check_backward_reduce_args(op, grad_out, input, mean);
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor sum_dy = at::zeros({s.C}, acc_options);
  Tensor sum_dy_xmu = at::zeros({s.C}, acc_options);
  if (s.reduce_size() == 0 || s.C == 0) {
    return {sum_dy, sum_dy_xmu};
  }
  const Tensor dy = dense_grad(grad_out, input);
  const Tensor x = dense_input(input);
  const Tensor m = mean.contiguous();
  dispatch_input_and_param(input.scalar_type(), input.scalar_type(), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    grad_sums<scalar_t, param_t>(dy, x, s, m, sum_dy, sum_dy_xmu, m, std::nullopt, std::nullopt);
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& weight,
    const Tensor& sum_dy,
    const Tensor& sum_dy_xmu,
    const Tensor& counts) {
  const char* op = "bnorm_ext::batch_norm_backward_elemt";
  const BatchNormShape s =
      check_backward_elemt_args(op, grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, counts);
  c10::cuda::CUDAGuard guard(input.device());
  Tensor dx = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return dx;
  }
  const Tensor dy = dense_grad(grad_out, input);
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight);
  // NB: summed once, in double, on the device (no host sync).
  const Tensor n = counts.to(at::kDouble).sum().to(acc_scalar_type(input.scalar_type())).reshape({1});
  const Tensor m = mean.contiguous(), is = invstd.contiguous(), sdy = sum_dy.contiguous(),
               sdyx = sum_dy_xmu.contiguous();
  dispatch_input_and_param(
      input.scalar_type(), param_scalar_type(input, {&weight}), [&](auto scalar_tag, auto param_tag) {
        using scalar_t = decltype(scalar_tag);
        using param_t = decltype(param_tag);
        using acc_t = acc_type<scalar_t>;
        const BackwardCoeffLoader<acc_t, param_t, true> coeffs{
            m.const_data_ptr<acc_t>(),   is.const_data_ptr<acc_t>(),   opt_ptr<param_t>(w),
            sdy.const_data_ptr<acc_t>(), sdyx.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>()};
        grad_input<scalar_t, decltype(coeffs), true>(dy, x, dx, s, coeffs);
      });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_backward";
  const BatchNormShape s = check_backward_args(
      op, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  const auto acc = acc_scalar_type(input.scalar_type());
  c10::cuda::CUDAGuard guard(input.device());
  const auto [mean, invstd] = backward_stats(training, save_mean, save_invstd, running_mean, running_var, eps, acc);
  const auto param_options =
      input.options().dtype(weight.has_value() && weight->defined() ? weight->scalar_type() : acc);
  Tensor grad_weight = at::zeros({s.C}, param_options);
  Tensor grad_bias = at::zeros({s.C}, param_options);
  Tensor dx = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return {dx, grad_weight, grad_bias};
  }
  backward_passes(
      dense_grad(grad_out, input), dense_input(input), dx, s, mean, invstd, contiguous_param(weight), grad_weight,
      grad_bias, training, param_scalar_type(input, {&weight, &running_mean, &running_var}),
      [](auto scalar_tag, auto, const auto& run) { run(PlainGrad<decltype(scalar_tag)>{}); });
  return {dx, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace bnorm_ext
