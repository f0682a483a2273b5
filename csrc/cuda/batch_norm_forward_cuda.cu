// CUDA forward ops. Training forward: the single-read kernel when the input
// fits on chip, else statistics (split per channel over the whole GPU, merged
// in a fixed order), one single-block finalize that also updates the running
// statistics on the device, and the vectorised normalize pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_single_read.cuh"

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

// Threads of the single-block finalize over C channels.
int finalize_threads(int64_t C) {
  return static_cast<int>(std::min<int64_t>(1024, ((C + 31) / 32) * 32));
}

template <typename acc_t, typename param_t>
StatsOutputs<acc_t, param_t> stats_outputs(
    double eps,
    bool output_var,
    Tensor& mean,
    Tensor& spread,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  return {static_cast<acc_t>(eps), output_var, mean.mutable_data_ptr<acc_t>(), spread.mutable_data_ptr<acc_t>(),
          opt_mutable_ptr<param_t>(running_mean), opt_mutable_ptr<param_t>(running_var),
          opt_mutable_ptr<int64_t>(num_batches_tracked), momentum.has_value(), momentum.value_or(0.0)};
}

// Statistics of a dense, non-empty input into out_mean / out_spread (invstd,
// or the biased var when output_var), updating the running stats if given.
template <typename scalar_t, typename param_t>
void stats_and_finalize(
    const Tensor& x,
    const BatchNormShape& s,
    double eps,
    bool output_var,
    Tensor& out_mean,
    Tensor& out_spread,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  using acc_t = acc_type<scalar_t>;
  const StatsReducer<scalar_t> reducer{x.const_data_ptr<scalar_t>()};
  Tensor partials;
  int64_t splits;
  std::tie(partials, splits) = launch_channel_reduce<StatsReducer<scalar_t>, scalar_t>(
      reducer, s, is_aligned16(x.const_data_ptr()), out_mean.options());
  finalize_stats_kernel<acc_t, param_t><<<1, finalize_threads(s.C), 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const WelfordData<acc_t>*>(partials.const_data_ptr<acc_t>()),
      s.C,
      splits,
      stats_outputs<acc_t, param_t>(eps, output_var, out_mean, out_spread, running_mean, running_var, num_batches_tracked, momentum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y = normalize(x) with coefficients from (mean, spread) per channel.
template <typename scalar_t, typename stat_t, typename param_t, bool kFromVar>
void normalize(
    const Tensor& x,
    Tensor& y,
    const BatchNormShape& s,
    const Tensor& mean,
    const Tensor& spread,
    const OptTensor& weight,
    const OptTensor& bias,
    double eps) {
  using acc_t = acc_type<scalar_t>;
  using Loader = NormalizeCoeffLoader<acc_t, stat_t, param_t, kFromVar>;
  const NormalizeOp<scalar_t, Loader> op{
      x.const_data_ptr<scalar_t>(),
      y.mutable_data_ptr<scalar_t>(),
      Loader{mean.const_data_ptr<stat_t>(), spread.const_data_ptr<stat_t>(), opt_ptr<param_t>(weight),
             opt_ptr<param_t>(bias), static_cast<acc_t>(eps)}};
  launch_channel_elementwise<NormalizeOp<scalar_t, Loader>, scalar_t>(
      op, s, is_aligned16(x.const_data_ptr()) && is_aligned16(y.const_data_ptr()));
}

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
    stats_and_finalize<scalar_t, param_t>(x, s, 0.0, /*output_var=*/true, mean, var, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
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
          stats_outputs<acc_t, param_t>(eps, /*output_var=*/false, out_mean, out_invstd, rm.flat(), rv.flat(),
                                        num_batches_tracked, momentum));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto running_type = running_mean.has_value() && running_mean->defined() ? running_mean->scalar_type() : mean.scalar_type();
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
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& mean,
    const Tensor& invstd) {
  const char* op = "bnorm_ext::batch_norm_elemt";
  const BatchNormShape s = check_elemt_args(op, input, weight, bias, mean, invstd);
  c10::cuda::CUDAGuard guard(input.device());
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  dispatch_input_and_param(input.scalar_type(), param_scalar_type(input, {&weight, &bias}), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    normalize<scalar_t, acc_type<scalar_t>, param_t, false>(x, out, s, mean.contiguous(), invstd.contiguous(), w, b, 0.0);
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
  const BatchNormShape s = check_train_args(op, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (s.reduce_size() == 0 || s.C == 0) {
    // NB: as torch: running stats untouched, num_batches_tracked still counts.
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      num_batches_tracked->add_(1);
    }
    return {out, at::zeros({s.C}, acc_options), at::full({s.C}, 1.0 / std::sqrt(eps), acc_options)};
  }
  Tensor save_mean = at::empty({s.C}, acc_options);
  Tensor save_invstd = at::empty({s.C}, acc_options);
  const FlatRunningStat rm(running_mean), rv(running_var);
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  const auto param_type = param_scalar_type(input, {&weight, &bias, &running_mean, &running_var});
  dispatch_input_and_param(input.scalar_type(), param_type, [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    using acc_t = acc_type<scalar_t>;
    const NormalizeEpilogue<scalar_t, param_t> epilogue{
        out.mutable_data_ptr<scalar_t>(), opt_ptr<param_t>(w), opt_ptr<param_t>(b),
        stats_outputs<acc_t, param_t>(eps, /*output_var=*/false, save_mean, save_invstd, rm.flat(), rv.flat(),
                                      num_batches_tracked, momentum)};
    const bool aligned = is_aligned16(x.const_data_ptr()) && is_aligned16(out.const_data_ptr());
    if (launch_single_read(StatsReducer<scalar_t>{x.const_data_ptr<scalar_t>()}, epilogue, s, aligned, acc_options)) {
      return;
    }
    stats_and_finalize<scalar_t, param_t>(x, s, eps, /*output_var=*/false, save_mean, save_invstd, rm.flat(), rv.flat(), num_batches_tracked, momentum);
    normalize<scalar_t, acc_t, param_t, false>(x, out, s, save_mean, save_invstd, w, b, eps);
  });
  rm.write_back();
  rv.write_back();
  return {out, save_mean, save_invstd};
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
  c10::cuda::CUDAGuard guard(input.device());
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  const Tensor rm_c = running_mean.contiguous();
  const Tensor rv_c = running_var.contiguous();
  dispatch_input_and_param(input.scalar_type(), running_mean.scalar_type(), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    normalize<scalar_t, param_t, param_t, true>(x, out, s, rm_c, rv_c, w, b, eps);
  });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats_cuda);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cuda);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cuda);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cuda);
}

} // namespace cuda
} // namespace bnorm_ext
