// CPU reference kernels of the forward ops: statistics, running-stat update,
// normalization. Readable first; vectorised through LaneSum and plain
// channel-innermost loops the compiler can vectorise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"
#include "batch_norm_cpu.h"
#include "batch_norm_cpu_loops.h"

namespace bnorm_ext {
namespace cpu {

using Stats = WelfordData<double>;

#define BNORM_EXT_CPU_KERNELS "batch_norm_forward_cpu_kernels.inc"
#include "batch_norm_cpu_isa_builds.inc"

namespace {

std::vector<Stats> channel_stats_any(const Tensor& x, const BatchNormShape& s) {
  std::vector<Stats> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    stats = BNORM_EXT_CPU_DISPATCH(channel_stats<scalar_t>(x, s));
  });
  return stats;
}

}  // namespace

// training: batch statistics (float32 computed in double, see Normalize);
// otherwise running statistics (eval).
Tensor normalize_cpu(
    const Tensor& input,
    const BatchNormShape& s,
    const OptTensor& weight,
    const OptTensor& bias,
    const std::vector<double>& mean,
    const std::vector<double>& invstd,
    bool training) {
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  const std::vector<double> b = param_values(bias, s.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_elemt_cpu", [&] {
    const auto run = [&](auto op) {
      using Op = decltype(op);
      std::vector<typename Op::Coeffs> coeffs(s.C);
      for (int64_t c = 0; c < s.C; ++c) {
        coeffs[c] = Op::coeffs(mean[c], invstd[c], w[c], b[c]);
      }
      BNORM_EXT_CPU_DISPATCH(normalize<scalar_t, Op>(x, out, s, coeffs));
    };
    if (training) {
      run(Normalize<scalar_t>{});
    } else {
      run(Normalize<scalar_t, acc_type<scalar_t>>{});
    }
  });
  return out;
}

std::vector<Stats> stats_cpu(const Tensor& input, const BatchNormShape& s) {
  return channel_stats_any(dense_input(input), s);
}

namespace {

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  const char* op = "bnorm_ext::batch_norm_stats";
  const BatchNormShape s = check_input(op, input);
  return saved_stats(channel_moments(stats_cpu(input, s), /*eps=*/std::nullopt), input);
}

std::tuple<Tensor, Tensor> batch_norm_gather_stats_cpu(
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
  const int64_t P = mean.size(0);
  const int64_t C = mean.size(1);
  const Tensor m = mean.to(at::kDouble).contiguous();
  const Tensor v = var.to(at::kDouble).contiguous();
  const Tensor n = counts.to(at::kDouble).contiguous();
  const double* m_data = m.const_data_ptr<double>();
  const double* v_data = v.const_data_ptr<double>();
  const double* n_data = n.const_data_ptr<double>();
  std::vector<Stats> stats(C, Stats{0.0, 0.0, 0.0});
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t p = 0; p < P; ++p) {
      const double count = n_data[p];
      stats[c] = welford_merge(stats[c], Stats{count, m_data[p * C + c], v_data[p * C + c] * count});
    }
  }
  update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
  return saved_stats(channel_moments(stats, eps), mean);
}

Tensor batch_norm_elemt_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& mean, const Tensor& invstd) {
  const char* op = "bnorm_ext::batch_norm_elemt";
  const BatchNormShape s = check_elemt_args(op, input, weight, bias, mean, invstd);
  return normalize_cpu(
      input, s, weight, bias, param_values(mean, s.C, 0.0), param_values(invstd, s.C, 0.0), /*training=*/true);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_train_cpu(
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
  if (use_channel_fused_path(s, 1, input.element_size())) {
    const Tensor x = dense_input(input);
    Tensor out = at::empty_like(input, output_memory_format(input));
    std::vector<Stats> stats;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_train_cpu", [&] {
      stats = BNORM_EXT_CPU_DISPATCH(
          train_forward_channel_fused<scalar_t>(
              x, out, s, param_values(weight, s.C, 1.0), param_values(bias, s.C, 0.0), eps));
    });
    update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
    auto [save_mean, save_invstd] = saved_stats(channel_moments(stats, eps), input);
    return {out, save_mean, save_invstd};
  }
  const std::vector<Stats> stats = stats_cpu(input, s);
  update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
  const ChannelMoments moments = channel_moments(stats, eps);
  // NB: normalized with the double statistics, more accurate than the
  // acc-rounded save_mean when |mean| >> std.
  Tensor out = normalize_cpu(input, s, weight, bias, moments.mean, moments.spread, /*training=*/true);
  auto [save_mean, save_invstd] = saved_stats(moments, input);
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_forward_eval_cpu(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_forward_eval";
  const BatchNormShape s = check_eval_args(op, input, weight, bias, running_mean, running_var, eps);
  const std::vector<double> mean = param_values(running_mean, s.C, 0.0);
  std::vector<double> invstd = param_values(running_var, s.C, 1.0);
  for (double& v : invstd) {
    v = invstd_from_var(v, eps);
  }
  return normalize_cpu(input, s, weight, bias, mean, invstd, /*training=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats_cpu);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cpu);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cpu);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cpu);
}

}  // namespace cpu
}  // namespace bnorm_ext
