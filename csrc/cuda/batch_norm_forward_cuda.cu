// CUDA forward ops. Training forward: the single-read kernel when the input
// fits on chip, else statistics (split per channel over the whole GPU, merged
// in a fixed order), one single-block finalize that also updates the running
// statistics on the device, and the vectorised normalize pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_passes.cuh"

namespace bnorm_ext {
namespace cuda {

at::ScalarType param_scalar_type(const Tensor& input, std::initializer_list<const OptTensor*> params) {
  for (const OptTensor* p : params) {
    if (p->has_value() && (*p)->defined()) {
      return (*p)->scalar_type();
    }
  }
  return input.scalar_type();
}

namespace {

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input) {
  const char* op = "bnorm_ext::batch_norm_stats";
  const BatchNormShape s = check_input(op, input);
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor mean = at::zeros({s.C}, acc_options);
  Tensor var = at::zeros({s.C}, acc_options);
  if (s.reduce_size() == 0 || s.C == 0) {
    return {mean, var};
  }
  const Tensor x = dense_input(input);
  dispatch_input_and_param(input.scalar_type(), input.scalar_type(), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    stats_and_finalize<scalar_t, param_t>(
        x, s, 0.0, /*output_var=*/true, mean, var, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> batch_norm_gather_stats_cuda(
    const Tensor& mean,
    const Tensor& var,
    const Tensor& counts,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_gather_stats";
  check_gather_args(op, mean, var, counts, running_mean, running_var, num_batches_tracked, momentum, eps);
  c10::cuda::CUDAGuard guard(mean.device());
  const int64_t P = mean.size(0);
  const int64_t C = mean.size(1);
  Tensor out_mean = at::empty({C}, mean.options());
  Tensor out_invstd = at::empty({C}, mean.options());
  if (C == 0 || P == 0) {
    // NB: no statistics at all, as the CPU reference: mean 0, var 0, running
    // stats untouched, num_batches_tracked still counts.
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      num_batches_tracked->add_(1);
    }
    return {out_mean.zero_(), out_invstd.fill_(1.0 / std::sqrt(eps))};
  }
  // [C, P, 3] Welford partials (count, mean, M2) in mean's dtype.
  const Tensor n = counts.to(mean.scalar_type()).view({P, 1}).expand({P, C});
  const Tensor partials = at::stack({n, mean, var * n}, -1).transpose(0, 1).contiguous();
  const FlatRunningStat rm(running_mean), rv(running_var);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm_gather_stats_cuda", [&] {
    using acc_t = scalar_t;
    const auto launch = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      finalize_stats_kernel<acc_t, param_t><<<1, finalize_threads(C), 0, c10::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const WelfordData<acc_t>*>(partials.const_data_ptr<acc_t>()), C, P,
          stats_outputs<acc_t, param_t>(
              eps, /*output_var=*/false, out_mean, out_invstd, rm.flat(), rv.flat(), num_batches_tracked, momentum));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto running_type =
        running_mean.has_value() && running_mean->defined() ? running_mean->scalar_type() : mean.scalar_type();
    if (running_type == at::kHalf) {
      launch(at::Half{});
    } else if (running_type == at::kBFloat16) {
      launch(at::BFloat16{});
    } else {
      launch(acc_t{});
    }
  });
  rm.write_back();
  rv.write_back();
  return {out_mean, out_invstd};
}

Tensor batch_norm_elemt_cuda(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& mean, const Tensor& invstd) {
  const char* op = "bnorm_ext::batch_norm_elemt";
  const BatchNormShape s = check_elemt_args(op, input, weight, bias, mean, invstd);
  c10::cuda::CUDAGuard guard(input.device());
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  dispatch_input_and_param(
      input.scalar_type(), param_scalar_type(input, {&weight, &bias}), [&](auto scalar_tag, auto param_tag) {
        using scalar_t = decltype(scalar_tag);
        using param_t = decltype(param_tag);
        normalize<scalar_t, acc_type<scalar_t>, param_t, false>(
            x, out, s, mean.contiguous(), invstd.contiguous(), w, b, 0.0);
      });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_train_cuda(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_forward_train";
  const BatchNormShape s =
      check_train_args(op, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  return forward_train(
      s, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
      [](auto, const auto& run) { run(NormalizedOnly{}); });
}

Tensor batch_norm_forward_eval_cuda(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_forward_eval";
  const BatchNormShape s = check_eval_args(op, input, weight, bias, running_mean, running_var, eps);
  return forward_eval(
      s, input, weight, bias, running_mean, running_var, eps, [](auto, const auto& run) { run(NormalizedOnly{}); });
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats_cuda);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cuda);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cuda);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cuda);
}

}  // namespace cuda
}  // namespace bnorm_ext
